//! The registry's rule language: `Registry::new` on fuzzed `[[cgroup.roots]]` (paths, patterns,
//! regexes, templates, metadata files), then `classify`, `classify_with` (fuzzed container
//! labels) and `is_under_root` on fuzzed cgroup paths.
//!
//! Inputs are built from pieces (`{function}`, `*`, `/`, `(?P<name>...)`, literals) as well as
//! raw text, so that most rules compile and most paths fall under a root.
#![no_main]

use arbitrary::Arbitrary;
use emars_agent::config::{RootConfig, RuleConfig};
use emars_agent::model::registry::{
    valid_function_name, Classified, Registry, MAX_INSTANCE_NAME_LEN,
};
use emars_agent::model::runtime::{Labels, MetadataRead};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    roots: Vec<Root>,
    paths: Vec<CgroupPath>,
    /// What every container metadata file holds.
    labels: Vec<(String, String)>,
}

#[derive(Arbitrary, Debug)]
struct Root {
    path: Text,
    rules: Vec<Rule>,
}

#[derive(Arbitrary, Debug)]
struct Rule {
    pattern: Option<Text>,
    regex: Option<Text>,
    function: Option<Text>,
    instance: Option<Text>,
    metadata: Option<Text>,
}

#[derive(Arbitrary, Debug)]
enum CgroupPath {
    Raw(String),
    /// Below the root with this index (modulo the number of roots), as the kernel writes it.
    UnderRoot(u8, Vec<Text>),
}

/// Raw text, or text assembled from the pieces of the rule language.
#[derive(Arbitrary, Debug)]
enum Text {
    Raw(String),
    Pieces(Vec<Piece>),
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Literal(String),
    Slash,
    Star,
    /// `{name}`
    Placeholder(Name),
    /// `(?P<name>...)`
    Group(Name, Class),
    /// `{label:KEY}`
    Label(String),
    Char(char),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Name {
    Function,
    Instance,
    Other(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Class {
    Segment,
    Lower,
    Digits,
    Any,
}

impl Name {
    fn as_str(self) -> String {
        match self {
            Name::Function => "function".to_string(),
            Name::Instance => "instance".to_string(),
            Name::Other(n) => format!("c{}", n % 4),
        }
    }
}

impl Text {
    fn render(&self) -> String {
        let pieces = match self {
            Text::Raw(s) => return s.clone(),
            Text::Pieces(pieces) => pieces,
        };
        let mut out = String::new();
        for piece in pieces {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Slash => out.push('/'),
                Piece::Star => out.push('*'),
                Piece::Placeholder(name) => out.push_str(&format!("{{{}}}", name.as_str())),
                Piece::Group(name, class) => {
                    let class = match class {
                        Class::Segment => "[^/]+",
                        Class::Lower => "[a-z]+",
                        Class::Digits => r"\d+",
                        Class::Any => ".*",
                    };
                    out.push_str(&format!("(?P<{}>{class})", name.as_str()));
                }
                Piece::Label(key) => out.push_str(&format!("{{label:{key}}}")),
                Piece::Char(c) => out.push(*c),
            }
        }
        out
    }
}

impl Rule {
    fn config(&self) -> RuleConfig {
        RuleConfig {
            pattern: self.pattern.as_ref().map(Text::render),
            regex: self.regex.as_ref().map(Text::render),
            function: self.function.as_ref().map(Text::render),
            instance: self.instance.as_ref().map(Text::render),
            metadata: self.metadata.as_ref().map(Text::render),
        }
    }
}

impl CgroupPath {
    fn render(&self, roots: &[String]) -> String {
        match self {
            CgroupPath::Raw(s) => s.clone(),
            CgroupPath::UnderRoot(i, segments) => {
                let mut path = roots[usize::from(*i) % roots.len()].clone();
                for segment in segments {
                    path.push('/');
                    path.push_str(&segment.render());
                }
                path
            }
        }
    }
}

fn check(registry: &Registry, path: &str, labels: &Labels) {
    let under = registry.is_under_root(path);
    // Named from container labels: a file asked for stays an absolute path without "." or
    // "..", and what comes out is as valid as a path rule's names.
    let mut read = |file: &std::path::Path| {
        let text = file.to_string_lossy();
        assert!(
            text.starts_with('/'),
            "metadata file {file:?} is not absolute"
        );
        assert!(
            !text.split('/').any(|c| c == ".." || c == "."),
            "metadata file {file:?} leaves its directory"
        );
        MetadataRead::Labels(labels.clone())
    };
    for wait in [false, true] {
        if let Classified::Labelled(identity) | Classified::Instance(identity) =
            registry.classify_with(path, &mut read, wait)
        {
            assert!(under, "{path:?} is classified but not under a root");
            assert!(
                valid_function_name(&identity.function),
                "{path:?}: invalid function {identity:?}"
            );
            assert!(
                (1..=MAX_INSTANCE_NAME_LEN).contains(&identity.instance.len())
                    && !identity.instance.chars().any(char::is_control),
                "{path:?}: invalid instance {identity:?}"
            );
        }
    }
    if let Some(identity) = registry.classify(path) {
        assert!(under, "{path:?} is classified but not under a root");
        assert!(
            valid_function_name(&identity.function),
            "{path:?}: invalid function {identity:?}"
        );
        let instance = &identity.instance;
        assert!(
            (1..=MAX_INSTANCE_NAME_LEN).contains(&instance.len())
                && !instance.chars().any(char::is_control),
            "{path:?}: invalid instance {identity:?}"
        );
    }
    // Below a root means below it whatever the depth.
    if under {
        let child = format!("{path}/x");
        assert!(
            registry.is_under_root(&child),
            "{child:?} is not under a root"
        );
    }
}

/// Normalised roots are kernel-style, under themselves but not instances, and disjoint.
fn check_roots(registry: &Registry, roots: &[String]) {
    for (i, root) in roots.iter().enumerate() {
        let normal = root.starts_with('/') && !root.ends_with('/') && !root.contains("//");
        assert!(normal, "root {root:?} is not normalised");
        assert!(
            registry.is_under_root(root),
            "root {root:?} is not under a root"
        );
        assert_eq!(
            registry.classify(root),
            None,
            "root {root:?} is an instance"
        );
        for other in &roots[..i] {
            let overlap = contains(root, other) || contains(other, root);
            assert!(!overlap, "roots {root:?} and {other:?} overlap");
        }
    }
}

/// `inner` is `outer` or below it.
fn contains(outer: &str, inner: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fuzz_target!(|input: Input| {
    let roots: Vec<RootConfig> = input
        .roots
        .iter()
        .map(|root| RootConfig {
            path: root.path.render(),
            create: true,
            rules: root.rules.iter().map(Rule::config).collect(),
        })
        .collect();
    let Ok(registry) = Registry::new(&roots) else {
        return;
    };
    let normalised = registry.roots();
    check_roots(&registry, &normalised);
    let labels: Labels = input.labels.iter().cloned().collect();
    for path in &input.paths {
        check(&registry, &path.render(&normalised), &labels);
    }
});
