//! The pipeline's import direction, checked on the source tree: a file of a lower stage never
//! names an item of a higher one (`use`, a path in code or a type, or `crate::` inside a
//! macro). Stages, bottom up: the leaves (`view`, `files`, `clock`, `size`, `config_error`),
//! `kernel`, `model`, `store`, `policy`, the daemon (`daemon/`, `config.rs`), `api`,
//! `cli` (`cli/`, `main.rs`). `#[cfg(test)]` items are exempt: tests may reach up.

use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// The rank of a top-level module; `None` for one the table does not know (a test failure:
/// every new top-level module gets a stage).
fn stage_rank(top: &str) -> Option<(u8, &'static str)> {
    Some(match top {
        "view" | "files" | "clock" | "size" | "config_error" => (0, "leaf"),
        "kernel" => (1, "kernel"),
        "model" => (2, "model"),
        "store" => (3, "store"),
        "policy" => (4, "policy"),
        "daemon" | "config" => (5, "daemon"),
        "api" => (6, "api"),
        "cli" | "main" => (7, "cli"),
        _ => return None,
    })
}

/// The module path of a file under `src/`: `policy/actuator.rs` is `[policy, actuator]`,
/// `policy/mod.rs` is `[policy]`, `lib.rs` is `[]`, `main.rs` is `[main]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("a file under src/");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading the source tree") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            into.push(path);
        }
    }
}

/// One crate path a file names: the resolved top-level module and the text, at a line.
struct Named {
    line: usize,
    top: String,
    text: String,
}

struct Collector {
    /// The module the visitor is in (the file's path, then inline `mod` blocks).
    module: Vec<String>,
    named: Vec<Named>,
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg") && {
            let tokens = attr.meta.require_list().map(|list| list.tokens.to_string());
            tokens.is_ok_and(|tokens| {
                tokens
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .any(|word| word == "test")
                    && !tokens.contains("not")
            })
        }
    })
}

impl Collector {
    /// Resolves a path's leading segments (`crate`, `super`, `self`, `emars_agent`) to its
    /// top-level module; `None` for a path outside the crate.
    fn resolve(&self, segments: &[String]) -> Option<String> {
        let first = segments.first()?;
        match first.as_str() {
            "crate" | "emars_agent" => segments.get(1).cloned(),
            "super" | "self" => {
                let mut module = self.module.clone();
                let mut rest = segments;
                while let Some(head) = rest.first() {
                    match head.as_str() {
                        "super" => {
                            module.pop();
                        }
                        "self" => {}
                        _ => break,
                    }
                    rest = &rest[1..];
                }
                module.first().cloned().or_else(|| rest.first().cloned())
            }
            _ => None,
        }
    }

    fn record(&mut self, segments: Vec<String>, line: usize) {
        if let Some(top) = self.resolve(&segments) {
            self.named.push(Named {
                line,
                top,
                text: segments.join("::"),
            });
        }
    }

    /// Every leaf of a use tree, as its full path (`use crate::{a::b, c}` names `crate::a::b`
    /// and `crate::c`).
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.use_tree(prefix, &path.tree);
                prefix.pop();
            }
            syn::UseTree::Name(name) => {
                let mut full = prefix.clone();
                full.push(name.ident.to_string());
                self.record(full, name.ident.span().start().line);
            }
            syn::UseTree::Rename(rename) => {
                let mut full = prefix.clone();
                full.push(rename.ident.to_string());
                self.record(full, rename.ident.span().start().line);
            }
            syn::UseTree::Glob(glob) => {
                let mut full = prefix.clone();
                full.push("*".to_owned());
                self.record(full, glob.star_token.spans[0].start().line);
            }
            syn::UseTree::Group(group) => {
                for item in &group.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Const(item) => &item.attrs,
            syn::Item::Enum(item) => &item.attrs,
            syn::Item::Fn(item) => &item.attrs,
            syn::Item::Impl(item) => &item.attrs,
            syn::Item::Macro(item) => &item.attrs,
            syn::Item::Mod(item) => &item.attrs,
            syn::Item::Static(item) => &item.attrs,
            syn::Item::Struct(item) => &item.attrs,
            syn::Item::Trait(item) => &item.attrs,
            syn::Item::Type(item) => &item.attrs,
            syn::Item::Use(item) => &item.attrs,
            _ => &[],
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_impl_item_fn(&mut self, item: &'ast syn::ImplItemFn) {
        if !is_cfg_test(&item.attrs) {
            syn::visit::visit_impl_item_fn(self, item);
        }
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        self.module.push(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
        self.module.pop();
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments = path
            .segments
            .iter()
            .map(|segment| segment.ident.to_string())
            .collect();
        let line = path
            .segments
            .first()
            .map_or(0, |segment| segment.ident.span().start().line);
        self.record(segments, line);
        syn::visit::visit_path(self, path);
    }

    /// Macro bodies are tokens to syn: `crate::a` (or `super::a`) sequences inside them count.
    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

impl Collector {
    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        let tokens: Vec<proc_macro2::TokenTree> = tokens.into_iter().collect();
        let mut index = 0;
        while index < tokens.len() {
            match &tokens[index] {
                proc_macro2::TokenTree::Group(group) => self.tokens(group.stream()),
                proc_macro2::TokenTree::Ident(ident)
                    if ident == "crate" || ident == "super" || ident == "emars_agent" =>
                {
                    // Collect `ident :: ident :: ...` (each `::` is two `:` puncts).
                    let mut segments = vec![ident.to_string()];
                    let mut next = index + 1;
                    while let (
                        Some(proc_macro2::TokenTree::Punct(a)),
                        Some(proc_macro2::TokenTree::Punct(b)),
                        Some(proc_macro2::TokenTree::Ident(segment)),
                    ) = (tokens.get(next), tokens.get(next + 1), tokens.get(next + 2))
                    {
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        segments.push(segment.to_string());
                        next += 3;
                    }
                    if segments.len() > 1 {
                        self.record(segments, ident.span().start().line);
                    }
                    index = next;
                    continue;
                }
                _ => {}
            }
            index += 1;
        }
    }
}

/// The modules declared `#[cfg(test)] mod name;` in a file of their own (this one, and tests
/// kept beside a module, such as `model/tracker/tests.rs`): exempt, with what is below them.
fn test_only_modules(src: &Path, files: &[PathBuf]) -> Vec<Vec<String>> {
    let mut exempt = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("reading a source file");
        let parsed = syn::parse_file(&text).expect("parsing a source file");
        let module = module_path(src, file);
        for item in &parsed.items {
            if let syn::Item::Mod(m) = item {
                if m.content.is_none() && is_cfg_test(&m.attrs) {
                    let mut path = module.clone();
                    path.push(m.ident.to_string());
                    exempt.push(path);
                }
            }
        }
    }
    exempt
}

/// Every upward import in the files under `src`, one line each.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let exempt = test_only_modules(src, &files);
    let mut found = Vec::new();
    for file in files {
        let module = module_path(src, &file);
        let Some(top) = module.first() else {
            continue; // lib.rs: the module list
        };
        if exempt.iter().any(|e| module.starts_with(e)) {
            continue;
        }
        let shown = file
            .strip_prefix(src)
            .unwrap_or(&file)
            .display()
            .to_string();
        let Some((rank, stage)) = stage_rank(top) else {
            found.push(format!(
                "src/{shown}: module `{top}` has no stage in the layering table"
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("reading a source file");
        let parsed = syn::parse_file(&text).unwrap_or_else(|e| panic!("parsing {shown}: {e}"));
        let mut collector = Collector {
            module: module.clone(),
            named: Vec::new(),
        };
        collector.visit_file(&parsed);
        for named in collector.named {
            let Some((named_rank, named_stage)) = stage_rank(&named.top) else {
                continue; // an item of lib.rs itself
            };
            if named_rank > rank {
                found.push(format!(
                    "src/{shown}:{}: {stage} names {} ({named_stage})",
                    named.line, named.text
                ));
            }
        }
    }
    found
}

#[test]
fn lower_stages_never_import_higher_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "imports against the pipeline's direction ({}):\n{}",
        found.len(),
        found.join("\n")
    );
}

#[test]
fn the_check_sees_use_trees_super_paths_and_macros() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("kernel")).unwrap();
    std::fs::create_dir_all(src.join("model")).unwrap();
    std::fs::write(
        src.join("kernel/mod.rs"),
        "use crate::{clock::Clock, model::{a::B, c}};\n\
         fn f() -> crate::policy::X { super::store::open(); tracing::info!(\"{}\", crate::api::Y) }\n\
         #[cfg(test)] mod tests { use crate::cli::Z; }\n",
    )
    .unwrap();
    std::fs::write(src.join("model/mod.rs"), "use super::kernel::K;\n").unwrap();
    let found = violations(src);
    let expected = [
        "src/kernel/mod.rs:1: kernel names crate::model::a::B (model)",
        "src/kernel/mod.rs:1: kernel names crate::model::c (model)",
        "src/kernel/mod.rs:2: kernel names crate::policy::X (policy)",
        "src/kernel/mod.rs:2: kernel names super::store::open (store)",
        "src/kernel/mod.rs:2: kernel names crate::api::Y (api)",
    ];
    assert_eq!(found, expected, "{found:#?}");
}
