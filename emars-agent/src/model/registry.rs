//! Which function and instance a cgroup belongs to, and the table of cgroups the agent tracks.
//!
//! The platform encodes its sandboxes in cgroup paths (`<root>/<function>/<instance>` by default);
//! the `[[cgroup.roots]]` rules of the config (see docs/config.md) say how to read them. Rules are
//! compiled once, at start-up, so that a bad rule stops the agent with a message naming the key
//! instead of silently never matching.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use regex::{Captures, Regex};
use serde::{Deserialize, Serialize};

use crate::model::runtime::{Labels, MetadataRead};

mod names;
use names::is_function_byte;
pub use names::{
    valid_function_name, valid_instance_name, Unnamed, FUNCTION_NAME_PATTERN, FUNCTION_NAME_RULE,
    MAX_FUNCTION_NAME_LEN, MAX_INSTANCE_NAME_LEN,
};

/// Rule used for a root that lists none: `<root>/<function>/<instance>`.
pub const DEFAULT_PATTERN: &str = "{function}/{instance}";
const DEFAULT_FUNCTION_TEMPLATE: &str = "{function}";
const DEFAULT_INSTANCE_TEMPLATE: &str = "{instance}";

/// What a cgroup runs: which function, and which instance (sandbox) of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Identity {
    pub function: String,
    pub instance: String,
}

/// What the rules make of a cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// Named by a path rule.
    Instance(Identity),
    /// Named by a rule from the container's metadata.
    Labelled(Identity),
    /// The first rule that can decide reads a container metadata file that is not there yet.
    Pending {
        file: PathBuf,
    },
    NotInstance,
    /// The first matching path rule gives a name that cannot be used (see [`Unnamed`]): the
    /// cgroup is watched, but is no instance. Counted and logged by the tracker, so that an
    /// operator learns why a container is missing.
    Unnamed(Unnamed),
}

/// Normalises a root path to the form the kernel reports (`/emars`): adds the leading '/',
/// drops one trailing '/'. Returns the reason when the path cannot be a root.
pub(crate) fn normalize_root_path(path: &str) -> Result<String, String> {
    let mut p = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    if p.len() > 1 && p.ends_with('/') {
        p.pop();
    }
    if p == "/" {
        return Err(
            "a root cannot be the whole hierarchy: name a sub-directory such as /emars".to_string(),
        );
    }
    if let Some(below) = below_cgroup_mount(&p) {
        return Err(match below {
            Some(root) => format!(
                "is a filesystem path: a root is the path below the memory hierarchy's mount, \
                 as /proc/<pid>/cgroup shows it; write \"{root}\""
            ),
            None => "is a filesystem path to a whole hierarchy: a root is the path below the \
                     memory hierarchy's mount, such as /emars"
                .to_string(),
        });
    }
    // A second trailing '/' ("/a//") is an empty component too: only one is dropped.
    if p.contains("//") || p.ends_with('/') {
        return Err("has an empty path component (\"//\")".to_string());
    }
    if p.split('/').any(|c| c == "." || c == "..") {
        return Err("must not contain \".\" or \"..\" components".to_string());
    }
    if p.chars().any(char::is_control) {
        return Err("must not contain control characters".to_string());
    }
    if p.len() > emars_common::ROOT_PREFIX_LEN {
        return Err(format!(
            "is {} bytes long; the kernel-side root table holds prefixes of at most {} bytes",
            p.len(),
            emars_common::ROOT_PREFIX_LEN
        ));
    }
    Ok(p)
}

/// For a path under /sys/fs/cgroup (a filesystem path, where a root relative to the hierarchy
/// is meant): Some(the root it names), or Some(None) when it names a whole hierarchy. A v1
/// controller's mount directory (`memory`, `unified`, `cpu,cpuacct`...) is dropped with it.
fn below_cgroup_mount(path: &str) -> Option<Option<String>> {
    const V1_MOUNTS: &[&str] = &[
        "memory",
        "unified",
        "systemd",
        "cpu",
        "cpuacct",
        "cpu,cpuacct",
        "cpuset",
        "blkio",
        "pids",
        "devices",
        "freezer",
        "hugetlb",
        "perf_event",
        "net_cls",
        "net_prio",
        "net_cls,net_prio",
        "rdma",
        "misc",
    ];
    let rest = path.strip_prefix("/sys/fs/cgroup")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let mut parts: Vec<&str> = rest.split('/').filter(|c| !c.is_empty()).collect();
    if parts.first().is_some_and(|c| V1_MOUNTS.contains(c)) {
        parts.remove(0);
    }
    Some((!parts.is_empty()).then(|| format!("/{}", parts.join("/"))))
}

/// One piece of a pattern or template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `{name}`: in a pattern it captures, in a template it is replaced.
    Placeholder(String),
    /// `*` in a pattern: any text inside one path segment.
    Star,
    /// `{label:KEY}` in a template of a rule with `metadata`: the container's label KEY.
    Label(String),
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Splits `text` into literals and `{name}` placeholders (and `*` when `star` is set).
fn tokenize(text: &str, star: bool) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        match c {
            '{' => {
                let Some(end) = rest.find('}') else {
                    return Err("has a '{' without a closing '}'".to_string());
                };
                let name = &rest[..end];
                if let Some(key) = name.strip_prefix("label:") {
                    if key.is_empty() || key.chars().any(|c| c.is_control() || c == '{') {
                        return Err(format!(
                            "\"{{{name}}}\" names no label: write {{label:KEY}}"
                        ));
                    }
                    if !literal.is_empty() {
                        tokens.push(Token::Literal(std::mem::take(&mut literal)));
                    }
                    tokens.push(Token::Label(key.to_string()));
                    rest = &rest[end + 1..];
                    continue;
                }
                if !is_identifier(name) {
                    return Err(format!(
                        "\"{{{name}}}\" is not a placeholder: a placeholder is {{name}} with a \
                         name of letters, digits and '_' that does not start with a digit"
                    ));
                }
                if !literal.is_empty() {
                    tokens.push(Token::Literal(std::mem::take(&mut literal)));
                }
                tokens.push(Token::Placeholder(name.to_string()));
                rest = &rest[end + 1..];
            }
            '}' => return Err("has a '}' without an opening '{'".to_string()),
            '*' if star => {
                if !literal.is_empty() {
                    tokens.push(Token::Literal(std::mem::take(&mut literal)));
                }
                tokens.push(Token::Star);
            }
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        tokens.push(Token::Literal(literal));
    }
    Ok(tokens)
}

/// Compiles a `pattern` into an anchored regex and the names it captures.
fn compile_pattern(pattern: &str) -> Result<(Regex, Vec<String>), String> {
    if pattern.is_empty() {
        return Err("must not be empty".to_string());
    }
    if pattern.starts_with('/') {
        return Err("is relative to the root: drop the leading '/'".to_string());
    }
    if pattern.ends_with('/') {
        return Err("must not end with '/'".to_string());
    }
    if pattern.contains("//") {
        return Err("has an empty path segment (\"//\")".to_string());
    }
    let mut re = String::from("^");
    let mut names: Vec<String> = Vec::new();
    for token in tokenize(pattern, true)? {
        match token {
            Token::Literal(text) => re.push_str(&regex::escape(&text)),
            Token::Star => re.push_str("[^/]*"),
            Token::Placeholder(name) => {
                if names.contains(&name) {
                    return Err(format!(
                        "uses {{{name}}} twice: a placeholder captures one value"
                    ));
                }
                re.push_str("(?P<");
                re.push_str(&name);
                re.push_str(">[^/]+)");
                names.push(name);
            }
            Token::Label(key) => {
                return Err(format!(
                    "{{label:{key}}} belongs in a function or instance template, not a pattern"
                ))
            }
        }
    }
    re.push('$');
    let regex = Regex::new(&re).map_err(|e| e.to_string())?;
    Ok((regex, names))
}

/// Compiles a `regex` rule, anchored at both ends, and returns its named groups.
fn compile_regex(source: &str) -> Result<(Regex, Vec<String>), String> {
    if source.is_empty() {
        return Err("must not be empty".to_string());
    }
    if source.starts_with('/') || source.starts_with("^/") {
        return Err(
            "matches the path relative to the root, which has no leading '/': drop it".to_string(),
        );
    }
    // Compiled alone first so that the error points into the user's text, not our wrapper.
    Regex::new(source).map_err(|e| e.to_string())?;
    // The group keeps an alternation such as `a|b` anchored as a whole.
    let regex = Regex::new(&format!("^(?:{source})$")).map_err(|e| e.to_string())?;
    let names = regex
        .capture_names()
        .flatten()
        .map(str::to_string)
        .collect();
    Ok((regex, names))
}

/// A `function` or `instance` template, checked against the captures of its rule.
#[derive(Debug)]
struct Template {
    tokens: Vec<Token>,
}

impl Template {
    /// `is_function`: literal text must also be valid in a function name, so that a rule that
    /// could never yield a valid name is refused at load time.
    /// `labels`: the rule reads the container's metadata, so `{label:KEY}` may appear.
    fn compile(
        text: &str,
        captures: &[String],
        is_function: bool,
        labels: bool,
    ) -> Result<Template, String> {
        if text.is_empty() {
            return Err("must not be empty".to_string());
        }
        let tokens = tokenize(text, false)?;
        let mut literal_len = 0;
        for token in &tokens {
            match token {
                Token::Label(key) if !labels => {
                    return Err(format!(
                        "uses {{label:{key}}}, but the rule reads no container metadata: set \
                         its metadata file"
                    ));
                }
                Token::Placeholder(name) if !captures.contains(name) => {
                    let known = if captures.is_empty() {
                        "it captures nothing".to_string()
                    } else {
                        let list: Vec<String> =
                            captures.iter().map(|c| format!("{{{c}}}")).collect();
                        format!("it captures {}", list.join(", "))
                    };
                    return Err(format!(
                        "uses {{{name}}}, which the rule's pattern or regex does not capture \
                         ({known}); use a fixed name or one of the captures"
                    ));
                }
                Token::Literal(lit) if is_function => {
                    if let Some(bad) = lit
                        .chars()
                        .find(|c| !(c.is_ascii() && is_function_byte(*c as u8)))
                    {
                        return Err(format!(
                            "'{bad}' cannot appear in a function name \
                             (allowed: A-Z a-z 0-9 . _ : -)"
                        ));
                    }
                    literal_len += lit.len();
                }
                Token::Literal(lit) => {
                    if lit.chars().any(char::is_control) {
                        return Err("must not contain control characters".to_string());
                    }
                    literal_len += lit.len();
                }
                _ => {}
            }
        }
        let max = if is_function {
            MAX_FUNCTION_NAME_LEN
        } else {
            MAX_INSTANCE_NAME_LEN
        };
        if literal_len > max {
            return Err(format!("has more than {max} bytes of fixed text"));
        }
        Ok(Template { tokens })
    }

    /// None when a label it names is not among `labels`.
    fn render(&self, caps: &Captures<'_>, labels: Option<&Labels>) -> Option<String> {
        let mut out = String::new();
        for token in &self.tokens {
            match token {
                Token::Literal(text) => out.push_str(text),
                // A group that did not take part in the match renders as nothing.
                Token::Placeholder(name) => {
                    out.push_str(caps.name(name).map_or("", |m| m.as_str()))
                }
                Token::Star => out.push('*'),
                Token::Label(key) => out.push_str(labels?.get(key)?),
            }
        }
        Some(out)
    }

    /// The metadata file of a matched cgroup. None when a capture would leave the directory
    /// the template names (a '/', "." or "..", or nothing).
    fn render_path(&self, caps: &Captures<'_>) -> Option<PathBuf> {
        let mut out = String::new();
        for token in &self.tokens {
            match token {
                Token::Literal(text) => out.push_str(text),
                Token::Placeholder(name) => {
                    let value = caps.name(name)?.as_str();
                    if value.is_empty() || value.contains('/') || value == "." || value == ".." {
                        return None;
                    }
                    out.push_str(value);
                }
                Token::Star | Token::Label(_) => return None,
            }
        }
        Some(PathBuf::from(out))
    }
}

/// Checks a `metadata` template: an absolute file path over the rule's captures.
fn compile_metadata(text: &str, captures: &[String]) -> Result<Template, String> {
    if !text.starts_with('/') {
        return Err("must be an absolute path, e.g. /run/runc/{id}/state.json".to_string());
    }
    if text.ends_with('/') {
        return Err("must name a file, not a directory".to_string());
    }
    if text.split('/').any(|c| c == "." || c == "..") {
        return Err("must not contain \".\" or \"..\" components".to_string());
    }
    let template = Template::compile(text, captures, false, false)?;
    if !template
        .tokens
        .iter()
        .any(|t| matches!(t, Token::Placeholder(_)))
    {
        return Err(
            "names no capture: one file for every container cannot tell them apart".to_string(),
        );
    }
    Ok(template)
}

#[derive(Debug)]
struct Rule {
    matcher: Regex,
    function: Template,
    instance: Template,
    /// The container's metadata file, when the templates use its labels.
    metadata: Option<Template>,
}

impl Rule {
    /// `key` is the rule's config key, e.g. `cgroup.roots[0].rules[1]`.
    fn compile(rule: &RuleConfig, key: &str) -> Result<Rule, InvalidRule> {
        let (matcher, captures) = match (&rule.pattern, &rule.regex) {
            (Some(pattern), None) => compile_pattern(pattern)
                .map_err(|reason| invalid(format!("{key}.pattern"), pattern, reason))?,
            (None, Some(regex)) => compile_regex(regex)
                .map_err(|reason| invalid(format!("{key}.regex"), regex, reason))?,
            (Some(_), Some(regex)) => {
                return Err(invalid(
                    format!("{key}.regex"),
                    regex,
                    "pattern is set too: a rule has exactly one of pattern or regex",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    key.to_string(),
                    &describe_rule(rule),
                    "a rule needs a pattern or a regex",
                ))
            }
        };
        let metadata = rule
            .metadata
            .as_deref()
            .map(|text| {
                compile_metadata(text, &captures)
                    .map_err(|reason| invalid(format!("{key}.metadata"), text, reason))
            })
            .transpose()?;
        let labels = metadata.is_some();
        let function_text = rule
            .function
            .as_deref()
            .unwrap_or(DEFAULT_FUNCTION_TEMPLATE);
        let function = Template::compile(function_text, &captures, true, labels)
            .map_err(|reason| invalid(format!("{key}.function"), function_text, reason))?;
        let instance_text = rule
            .instance
            .as_deref()
            .unwrap_or(DEFAULT_INSTANCE_TEMPLATE);
        let instance = Template::compile(instance_text, &captures, false, labels)
            .map_err(|reason| invalid(format!("{key}.instance"), instance_text, reason))?;
        let uses_labels = [&function, &instance]
            .iter()
            .any(|t| t.tokens.iter().any(|t| matches!(t, Token::Label(_))));
        if let (Some(text), false) = (&rule.metadata, uses_labels) {
            return Err(invalid(
                format!("{key}.metadata"),
                text,
                "is read for nothing: name a label in function or instance ({label:KEY})",
            ));
        }
        Ok(Rule {
            matcher,
            function,
            instance,
            metadata,
        })
    }

    /// Err(None) when the templates name a label `labels` lacks; Err(Some(why)) when they
    /// give a name that cannot be used.
    fn identity(
        &self,
        caps: &Captures<'_>,
        labels: Option<&Labels>,
    ) -> Result<Identity, Option<Unnamed>> {
        let function = self.function.render(caps, labels).ok_or(None)?;
        let instance = self.instance.render(caps, labels).ok_or(None)?;
        match Unnamed::check(&function, &instance) {
            Some(why) => Err(Some(why)),
            None => Ok(Identity { function, instance }),
        }
    }
}

/// A rule or root that cannot be used: `key` is the dotted config key
/// (`cgroup.roots[0].rules[1].regex`), so the config's error can name it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value \"{value}\" for {key}: {reason}")]
pub struct InvalidRule {
    pub key: String,
    pub value: String,
    pub reason: String,
}

fn invalid(key: String, value: &str, reason: impl Into<String>) -> InvalidRule {
    InvalidRule {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Inline-table rendering of a rule, for errors about the rule as a whole.
fn describe_rule(rule: &RuleConfig) -> String {
    let fields: Vec<String> = [
        ("pattern", &rule.pattern),
        ("regex", &rule.regex),
        ("function", &rule.function),
        ("instance", &rule.instance),
        ("metadata", &rule.metadata),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} = {v:?}")))
    .collect();
    if fields.is_empty() {
        "{}".to_string()
    } else {
        format!("{{ {} }}", fields.join(", "))
    }
}

#[derive(Debug)]
struct Root {
    /// Normalised: leading '/', no trailing '/'.
    path: String,
    rules: Vec<Rule>,
}

/// The compiled `[[cgroup.roots]]`: maps kernel cgroup paths to identities.
#[derive(Debug)]
pub struct Registry {
    roots: Vec<Root>,
}

impl Registry {
    /// Validates and compiles the roots; errors name the config key (`cgroup.roots[i]...`).
    pub fn new(roots: &[RootConfig]) -> Result<Registry, InvalidRule> {
        if roots.is_empty() {
            return Err(invalid(
                "cgroup.roots".to_string(),
                "[]",
                "name at least one root: EMARS never watches a whole hierarchy",
            ));
        }
        let max_roots = emars_common::MAX_ROOTS as usize;
        if roots.len() > max_roots {
            return Err(invalid(
                "cgroup.roots".to_string(),
                &format!("{} roots", roots.len()),
                format!("at most {max_roots} roots (the size of the kernel-side root table)"),
            ));
        }
        let mut compiled: Vec<Root> = Vec::with_capacity(roots.len());
        for (i, root) in roots.iter().enumerate() {
            let key = format!("cgroup.roots[{i}]");
            let path = normalize_root_path(&root.path)
                .map_err(|reason| invalid(format!("{key}.path"), &root.path, reason))?;
            if let Some((j, other)) = compiled
                .iter()
                .enumerate()
                .find(|(_, other)| contains(&other.path, &path) || contains(&path, &other.path))
            {
                return Err(invalid(
                    format!("{key}.path"),
                    &root.path,
                    format!(
                        "overlaps cgroup.roots[{j}].path \"{}\": roots must not contain one \
                         another, or a cgroup would have two sets of rules",
                        other.path
                    ),
                ));
            }
            let rules = if root.rules.is_empty() {
                vec![Rule::compile(
                    &RuleConfig {
                        pattern: Some(DEFAULT_PATTERN.to_string()),
                        ..RuleConfig::default()
                    },
                    &format!("{key}.rules[default]"),
                )?]
            } else {
                root.rules
                    .iter()
                    .enumerate()
                    .map(|(j, rule)| Rule::compile(rule, &format!("{key}.rules[{j}]")))
                    .collect::<Result<Vec<_>, _>>()?
            };
            compiled.push(Root { path, rules });
        }
        Ok(Registry { roots: compiled })
    }

    /// Normalised root paths relative to the hierarchy root, e.g. `/emars`.
    pub fn roots(&self) -> Vec<String> {
        self.roots.iter().map(|r| r.path.clone()).collect()
    }

    /// True for a root itself and anything below it. `rel_path` is the path as the kernel
    /// reports it (`/emars/fn/1`); matching is on whole components.
    pub fn is_under_root(&self, rel_path: &str) -> bool {
        self.locate(rel_path).is_some()
    }

    /// The identity a cgroup's path alone gives: rules that read container metadata are
    /// passed over. See [`Registry::classify_with`].
    pub fn classify(&self, rel_path: &str) -> Option<Identity> {
        match self.classify_with(rel_path, &mut |_| MetadataRead::Absent, false) {
            Classified::Instance(identity) | Classified::Labelled(identity) => Some(identity),
            Classified::Pending { .. } | Classified::NotInstance | Classified::Unnamed(_) => None,
        }
    }

    /// The identity given by the first rule of the containing root that matches. Not an
    /// instance: a root itself, paths outside all roots, no rule matching, or a first
    /// matching path rule that yields an invalid function or instance name.
    ///
    /// A rule with `metadata` reads the container's file through `read`: labels that give
    /// a valid identity decide; a file that is unusable, or lacks a label the templates name,
    /// passes to the next rule (the path rules behind it are the fallback). A file not there
    /// yet gives [`Classified::Pending`] when `wait` is set (runc writes its state after the
    /// cgroup's mkdir), else passes too.
    pub fn classify_with(
        &self,
        rel_path: &str,
        read: &mut dyn FnMut(&Path) -> MetadataRead,
        wait: bool,
    ) -> Classified {
        let Some((root, rest)) = self.locate(rel_path) else {
            return Classified::NotInstance;
        };
        if rest.is_empty() {
            return Classified::NotInstance;
        }
        for rule in &root.rules {
            let Some(caps) = rule.matcher.captures(rest) else {
                continue;
            };
            let Some(file) = &rule.metadata else {
                return match rule.identity(&caps, None) {
                    Ok(identity) => Classified::Instance(identity),
                    Err(Some(why)) => Classified::Unnamed(why),
                    Err(None) => Classified::NotInstance,
                };
            };
            let Some(path) = file.render_path(&caps) else {
                continue;
            };
            match read(&path) {
                MetadataRead::Labels(labels) => {
                    if let Ok(identity) = rule.identity(&caps, Some(&labels)) {
                        return Classified::Labelled(identity);
                    }
                }
                MetadataRead::Absent if wait => return Classified::Pending { file: path },
                MetadataRead::Absent => {}
                MetadataRead::Unusable(why) => tracing::warn!("container metadata: {why}"),
            }
        }
        Classified::NotInstance
    }

    /// The root containing `rel_path`, and the rest of the path below it without its leading
    /// '/' ("" for the root itself).
    fn locate<'a>(&self, rel_path: &'a str) -> Option<(&Root, &'a str)> {
        let path = rel_path.strip_prefix('/').unwrap_or(rel_path);
        let path = path.strip_suffix('/').unwrap_or(path);
        self.roots.iter().find_map(|root| {
            let rest = path.strip_prefix(&root.path[1..])?;
            if rest.is_empty() {
                Some((root, rest))
            } else {
                rest.strip_prefix('/').map(|rest| (root, rest))
            }
        })
    }
}

/// True when `inner` is `outer` or below it, on component boundaries.
fn contains(outer: &str, inner: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// One cgroup the agent tracks.
#[derive(Debug, Clone)]
pub struct CgroupEntry {
    /// Kernel cgroup id (inode of the cgroup directory).
    pub id: u64,
    /// Path relative to the hierarchy root, as the kernel reports it. Change it through
    /// [`CgroupTable::insert`], which keeps the path index in step.
    pub rel_path: String,
    /// None for cgroups under a root that no rule maps (kept so that their children and
    /// removal are still recognised).
    pub identity: Option<Identity>,
    pub started_at_ms: u64,
}

/// Live cgroups the agent knows: id ↔ path ↔ identity.
///
/// Kernel events name cgroups by id, the filesystem and the API by path; both lookups are
/// needed on hot paths, hence two indexes.
#[derive(Debug, Default)]
pub struct CgroupTable {
    by_id: BTreeMap<u64, CgroupEntry>,
    by_path: HashMap<String, u64>,
}

impl CgroupTable {
    /// Adds or replaces the entry of `id`. When a different id already has `rel_path` (a cgroup
    /// removed and re-created before its removal was seen), the path now names `id`; the old
    /// entry stays reachable by its id until removed, so its data can still be finalised.
    pub fn insert(
        &mut self,
        id: u64,
        rel_path: String,
        identity: Option<Identity>,
        started_at_ms: u64,
    ) {
        let entry = CgroupEntry {
            id,
            rel_path: rel_path.clone(),
            identity,
            started_at_ms,
        };
        if let Some(old) = self.by_id.insert(id, entry) {
            if old.rel_path != rel_path && self.by_path.get(&old.rel_path) == Some(&id) {
                self.by_path.remove(&old.rel_path);
            }
        }
        self.by_path.insert(rel_path, id);
    }

    pub fn get(&self, id: u64) -> Option<&CgroupEntry> {
        self.by_id.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut CgroupEntry> {
        self.by_id.get_mut(&id)
    }

    /// The id of the live cgroup at `rel_path`.
    pub fn by_path(&self, rel_path: &str) -> Option<u64> {
        let id = *self.by_path.get(rel_path)?;
        // Guards against an entry whose rel_path was edited through get_mut.
        (self.by_id.get(&id)?.rel_path == rel_path).then_some(id)
    }

    pub fn remove(&mut self, id: u64) -> Option<CgroupEntry> {
        let entry = self.by_id.remove(&id)?;
        if self.by_path.get(&entry.rel_path) == Some(&id) {
            self.by_path.remove(&entry.rel_path);
        }
        Some(entry)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Entries in ascending id order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &CgroupEntry)> {
        self.by_id.iter().map(|(id, entry)| (*id, entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    const DOC: &str = include_str!("../../../docs/config.md");
    const CID: &str = "328d87fcf413c999c8ddaae1861ccaeeda33d0a30bf8087923f14646a7e94b3f";
    const POD_UID: &str = "40001696-c377-4e56-9483-ae8e45533bae";
    const POD_UID_SYSTEMD: &str = "40001696_c377_4e56_9483_ae8e45533bae";

    fn registry(toml: &str) -> Registry {
        let config = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        Registry::new(&config.cgroup.roots).unwrap()
    }

    fn ident(function: &str, instance: &str) -> Option<Identity> {
        Some(Identity {
            function: function.to_string(),
            instance: instance.to_string(),
        })
    }

    /// The example must appear verbatim as a TOML block of docs/config.md, and classify each
    /// sample path as the docs' table says.
    fn check_example(toml: &str, cases: &[(String, Option<Identity>)]) {
        assert!(
            DOC.contains(&format!("```toml\n{toml}```")),
            "docs/config.md no longer shows this example:\n{toml}"
        );
        let reg = registry(toml);
        for (path, want) in cases {
            assert_eq!(&reg.classify(path), want, "classify({path:?})");
        }
    }

    fn case(path: impl Into<String>, want: Option<Identity>) -> (String, Option<Identity>) {
        (path.into(), want)
    }

    fn roots(toml_roots: &[(&str, &[&str])]) -> Vec<RootConfig> {
        toml_roots
            .iter()
            .map(|(path, patterns)| RootConfig {
                path: path.to_string(),
                create: true,
                rules: patterns
                    .iter()
                    .map(|p| RuleConfig {
                        pattern: Some(p.to_string()),
                        ..RuleConfig::default()
                    })
                    .collect(),
            })
            .collect()
    }

    fn invalid_key(err: impl Into<ConfigError>) -> (String, String, String) {
        match err.into() {
            ConfigError::Invalid { key, value, reason } => (key, value, reason),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    const EX_DEFAULT: &str = r#"[[cgroup.roots]]
path = "/emars"

[[cgroup.roots.rules]]
pattern = "{function}/{instance}"
"#;

    #[test]
    fn example_default_layout() {
        check_example(
            EX_DEFAULT,
            &[
                case("/emars/hello_world/1", ident("hello_world", "1")),
                case("/emars/mem_alloc/7f3a", ident("mem_alloc", "7f3a")),
                case("/emars", None),
                case("/emars/hello_world", None),
                case("/emars/hello_world/1/worker", None),
                case("/emars/bad name/1", None),
                case("/emarsx/hello_world/1", None),
                // docker run --cgroup-parent=/emars/hello_world (cgroupfs driver)
                case(
                    format!("/emars/hello_world/{CID}"),
                    ident("hello_world", CID),
                ),
            ],
        );
        // The written-out example is exactly the built-in default.
        let config = Config::from_toml_str(EX_DEFAULT).unwrap();
        assert_eq!(config.cgroup, Config::default().cgroup);
    }

    const EX_DOCKER_CGROUPFS: &str = r#"[[cgroup.roots]]
path = "/docker"

[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{64})'
function = "docker"
instance = "{id}"
"#;

    #[test]
    fn example_docker_cgroupfs() {
        check_example(
            EX_DOCKER_CGROUPFS,
            &[
                case(format!("/docker/{CID}"), ident("docker", CID)),
                case("/docker/buildkit", None),
                case(format!("/docker/{CID}/sub"), None),
                case(format!("/docker/{}", &CID[..63]), None),
            ],
        );
    }

    const EX_DOCKER_METADATA: &str = r#"[[cgroup.roots]]
path = "/docker"

[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{64})'
metadata = "/run/docker/runtime-runc/moby/{id}/state.json"
function = "{label:io.kubernetes.pod.namespace}.{label:io.kubernetes.container.name}"
instance = "{id}"

[[cgroup.roots.rules]]
regex = '(?P<id>[0-9a-f]{64})'
function = "docker"
instance = "{id}"
"#;

    /// The metadata example of docs/config.md: labels name the function; a container without
    /// the label, or whose file is unusable, falls to the path rule; one whose file is not
    /// written yet waits (when asked to).
    #[test]
    fn example_docker_metadata() {
        use crate::model::runtime::Labels;
        assert!(
            DOC.contains(EX_DOCKER_METADATA),
            "docs/config.md lost the example"
        );
        let config = Config::from_toml_str(EX_DOCKER_METADATA).unwrap();
        let reg = Registry::new(&config.cgroup.roots).unwrap();
        let file = format!("/run/docker/runtime-runc/moby/{CID}/state.json");
        let path = format!("/docker/{CID}");
        let labels = |pairs: &[(&str, &str)]| {
            let l: Labels = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            MetadataRead::Labels(l)
        };
        let with = |read: MetadataRead, wait: bool| {
            let mut asked = Vec::new();
            let got = reg.classify_with(
                &path,
                &mut |f| {
                    asked.push(f.to_path_buf());
                    read.clone()
                },
                wait,
            );
            assert_eq!(asked, vec![PathBuf::from(&file)]);
            got
        };
        const NS: &str = "io.kubernetes.pod.namespace";
        const NAME: &str = "io.kubernetes.container.name";
        let named = labels(&[(NS, "shop"), (NAME, "resize"), ("x", "y")]);
        assert_eq!(
            with(named, false),
            Classified::Labelled(Identity {
                function: "shop.resize".into(),
                instance: CID.into()
            })
        );
        let docker = Classified::Instance(Identity {
            function: "docker".into(),
            instance: CID.into(),
        });
        assert_eq!(with(labels(&[("x", "y")]), true), docker);
        // Without its namespace a name is not taken: it could be another tenant's function.
        assert_eq!(with(labels(&[(NAME, "resize")]), true), docker);
        let bad_name = labels(&[(NS, "shop"), (NAME, "a/b")]);
        assert_eq!(with(bad_name, true), docker);
        assert_eq!(with(MetadataRead::Unusable("fifo".into()), true), docker);
        assert_eq!(with(MetadataRead::Absent, false), docker);
        assert_eq!(
            with(MetadataRead::Absent, true),
            Classified::Pending {
                file: PathBuf::from(&file)
            }
        );
        // The path alone: the metadata rule is passed over.
        assert_eq!(reg.classify(&path), ident("docker", CID));
        assert_eq!(reg.classify("/docker/buildkit"), None);
    }

    #[test]
    fn metadata_rules_are_checked_at_load() {
        let rule = |metadata: &str, function: &str| {
            let toml = format!(
                "[[cgroup.roots]]\npath = \"/r\"\n[[cgroup.roots.rules]]\n\
                 pattern = \"{{id}}\"\nmetadata = {metadata:?}\nfunction = {function:?}\n\
                 instance = \"{{id}}\"\n"
            );
            let c: Config = toml::from_str(&toml).unwrap();
            Registry::new(&c.cgroup.roots).map(drop).map_err(|e| {
                let (key, _, reason) = invalid_key(e);
                (key, reason)
            })
        };
        assert_eq!(rule("/run/runc/{id}/state.json", "{label:fn}"), Ok(()));
        let err = |m: &str, f: &str| rule(m, f).unwrap_err();
        assert!(err("run/{id}.json", "{label:fn}").1.contains("absolute"));
        assert!(err("/run/../{id}.json", "{label:fn}").1.contains(".."));
        assert!(err("/run/state.json", "{label:fn}")
            .1
            .contains("names no capture"));
        assert!(err("/run/{other}.json", "{label:fn}").1.contains("{other}"));
        let (key, reason) = err("/run/{id}.json", "fixed");
        assert_eq!(key, "cgroup.roots[0].rules[0].metadata");
        assert!(reason.contains("read for nothing"), "{reason}");
        assert!(err("/run/{id}.json", "{label:}")
            .1
            .contains("names no label"));
        // A label without a metadata file to read it from.
        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
pattern = "{id}"
function = "{label:fn}"
instance = "{id}"
"#;
        let c: Config = toml::from_str(toml).unwrap();
        let (key, _, reason) = invalid_key(Registry::new(&c.cgroup.roots).unwrap_err());
        assert_eq!(key, "cgroup.roots[0].rules[0].function");
        assert!(reason.contains("reads no container metadata"), "{reason}");
        // In a pattern, a label is refused.
        let bad = Registry::new(&roots(&[("/r", &["{label:fn}/{instance}"])]));
        assert!(invalid_key(bad.unwrap_err()).2.contains("not a pattern"));
    }

    /// A capture that would leave the directory the metadata template names is not looked up.
    #[test]
    fn metadata_path_captures_stay_in_their_segment() {
        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
regex = '(?P<id>.+)'
metadata = "/run/runc/{id}/state.json"
function = "{label:fn}"
instance = "{id}"
"#;
        let reg = registry(toml);
        for path in ["/r/a/b", "/r/..", "/r/a/../../etc"] {
            let mut asked = false;
            let got = reg.classify_with(
                path,
                &mut |_| {
                    asked = true;
                    MetadataRead::Absent
                },
                true,
            );
            assert_eq!(got, Classified::NotInstance, "{path}");
            assert!(!asked, "{path} was looked up");
        }
    }

    const EX_DOCKER_SYSTEMD: &str = r#"[[cgroup.roots]]
path = "/system.slice"

[[cgroup.roots.rules]]
pattern = "docker-{id}.scope"
function = "docker"
instance = "{id}"
"#;

    #[test]
    fn example_docker_systemd() {
        check_example(
            EX_DOCKER_SYSTEMD,
            &[
                case(
                    format!("/system.slice/docker-{CID}.scope"),
                    ident("docker", CID),
                ),
                case("/system.slice/docker.service", None),
                case("/system.slice/sshd.service", None),
                case("/system.slice", None),
            ],
        );
    }

    const EX_K8S_SYSTEMD: &str = r#"[[cgroup.roots]]
path = "/kubepods.slice"

[[cgroup.roots.rules]]
pattern = "kubepods-{qos}.slice/kubepods-*-pod{pod}.slice/cri-containerd-{container}.scope"
function = "k8s-{qos}"
instance = "{container}"

[[cgroup.roots.rules]]
pattern = "kubepods-pod{pod}.slice/cri-containerd-{container}.scope"
function = "k8s-guaranteed"
instance = "{container}"
"#;

    #[test]
    fn example_kubernetes_systemd() {
        let u = POD_UID_SYSTEMD;
        check_example(
            EX_K8S_SYSTEMD,
            &[
                case(
                    format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"),
                    ident("k8s-burstable", CID),
                ),
                case(
                    format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"),
                    ident("k8s-besteffort", CID),
                ),
                case(
                    format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"),
                    ident("k8s-guaranteed", CID),
                ),
                case(
                    format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
                    None,
                ),
                case("/kubepods.slice/kubepods-burstable.slice", None),
            ],
        );
    }

    const EX_K8S_CGROUPFS: &str = r#"[[cgroup.roots]]
path = "/kubepods"

[[cgroup.roots.rules]]
pattern = "{qos}/pod{pod}/{container}"
function = "k8s-{qos}"
instance = "{container}"

[[cgroup.roots.rules]]
pattern = "pod{pod}/{container}"
function = "k8s-guaranteed"
instance = "{container}"
"#;

    #[test]
    fn example_kubernetes_cgroupfs() {
        let u = POD_UID;
        check_example(
            EX_K8S_CGROUPFS,
            &[
                case(
                    format!("/kubepods/burstable/pod{u}/{CID}"),
                    ident("k8s-burstable", CID),
                ),
                case(
                    format!("/kubepods/besteffort/pod{u}/{CID}"),
                    ident("k8s-besteffort", CID),
                ),
                case(
                    format!("/kubepods/pod{u}/{CID}"),
                    ident("k8s-guaranteed", CID),
                ),
                case(format!("/kubepods/burstable/pod{u}"), None),
            ],
        );
    }

    const EX_OPENLAMBDA: &str = r#"[[cgroup.roots]]
path = "/default-ol-sandboxes"

[[cgroup.roots.rules]]
pattern = "cg-{n}"
function = "openlambda"
instance = "cg-{n}"
"#;

    #[test]
    fn example_openlambda_fixed_name() {
        check_example(
            EX_OPENLAMBDA,
            &[
                case("/default-ol-sandboxes/cg-7", ident("openlambda", "cg-7")),
                case("/default-ol-sandboxes", None),
            ],
        );
    }

    const EX_OPENLAMBDA_WORKERS: &str = r#"[[cgroup.roots]]
path = "/hello_world-ol-sandboxes"

[[cgroup.roots.rules]]
regex = 'cg-(?P<n>[0-9]+)'
function = "hello_world"
instance = "cg-{n}"

[[cgroup.roots]]
path = "/mem_alloc-ol-sandboxes"

[[cgroup.roots.rules]]
regex = 'cg-(?P<n>[0-9]+)'
function = "mem_alloc"
instance = "cg-{n}"
"#;

    #[test]
    fn example_openlambda_one_root_per_worker() {
        check_example(
            EX_OPENLAMBDA_WORKERS,
            &[
                case(
                    "/hello_world-ol-sandboxes/cg-12",
                    ident("hello_world", "cg-12"),
                ),
                case("/mem_alloc-ol-sandboxes/cg-3", ident("mem_alloc", "cg-3")),
                case("/hello_world-ol-sandboxes/cg-x", None),
            ],
        );
    }

    const EX_OPENLAMBDA_CAPTURE: &str = r#"[[cgroup.roots]]
path = "/default-ol-sandboxes"

[[cgroup.roots.rules]]
pattern = "cg-{function}-{n}"
instance = "cg-{n}"
"#;

    #[test]
    fn example_openlambda_function_from_capture() {
        check_example(
            EX_OPENLAMBDA_CAPTURE,
            &[
                case(
                    "/default-ol-sandboxes/cg-mem-alloc-4",
                    ident("mem-alloc", "cg-4"),
                ),
                case(
                    "/default-ol-sandboxes/cg-hello_world-12",
                    ident("hello_world", "cg-12"),
                ),
                case("/default-ol-sandboxes/cg-7", None),
            ],
        );
    }

    #[test]
    fn documented_error_messages_are_the_real_ones() {
        let err = Config::from_toml_str("[store]\nretention_days = 0\n").unwrap_err();
        assert!(DOC.contains(&err.to_string()), "{err}");
        let err = Config::from_toml_str(
            "[[cgroup.roots]]\npath = \"/docker\"\n[[cgroup.roots.rules]]\nregex = '(?P<id>[0-9a-f]{64})'\n",
        )
        .unwrap_err();
        assert!(DOC.contains(&err.to_string()), "{err}");
        let err = Config::from_toml_str(
            "[[cgroup.roots]]\npath = \"/docker\"\n[[cgroup.roots.rules]]\nregex = '(?P<id>[0-9a-f]{64}'\n",
        )
        .unwrap_err();
        let shown = err.to_string();
        let head = shown.split("regex parse error").next().unwrap();
        assert!(
            DOC.contains(&format!("{head}regex parse error: ...")),
            "{err}"
        );
        let err = Config::from_toml_str("[store]\nretention = 3\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown field `retention`, expected one of `path`, `retention_days`, `max_functions`"),
            "{err}"
        );
    }

    #[test]
    fn roots_are_normalised_and_matched_on_component_boundaries() {
        let reg = Registry::new(&roots(&[("emars/", &[]), ("/other", &[])])).unwrap();
        assert_eq!(
            reg.roots(),
            vec!["/emars".to_string(), "/other".to_string()]
        );
        assert!(reg.is_under_root("/emars"));
        assert!(reg.is_under_root("/emars/fn"));
        assert!(reg.is_under_root("/emars/fn/1/deeper"));
        assert!(reg.is_under_root("/other/x"));
        assert!(!reg.is_under_root("/emarsx"));
        assert!(!reg.is_under_root("/emarsx/fn/1"));
        assert!(!reg.is_under_root("/emar"));
        assert!(!reg.is_under_root("/"));
        assert!(!reg.is_under_root(""));
        assert!(!reg.is_under_root("/system.slice/emars"));
        // Tolerates a missing leading '/' and a trailing '/'.
        assert!(reg.is_under_root("emars/fn/1"));
        assert_eq!(reg.classify("emars/fn/1/"), ident("fn", "1"));
        assert_eq!(reg.classify("/emarsx/fn/1"), None);
        assert_eq!(reg.classify("/other/fn/1"), ident("fn", "1"));
    }

    #[test]
    fn nested_root_paths_work() {
        let reg = Registry::new(&roots(&[("/a/b/c", &["{function}/{instance}"])])).unwrap();
        assert!(reg.is_under_root("/a/b/c/x"));
        assert!(!reg.is_under_root("/a/b"));
        assert_eq!(reg.classify("/a/b/c/x/1"), ident("x", "1"));
    }

    #[test]
    fn first_matching_rule_decides() {
        let toml = r#"
[[cgroup.roots]]
path = "/emars"
[[cgroup.roots.rules]]
pattern = "special/{instance}"
function = "special"
[[cgroup.roots.rules]]
pattern = "{function}/{instance}"
[[cgroup.roots.rules]]
pattern = "{function}"
instance = "only"
"#;
        let reg = registry(toml);
        assert_eq!(reg.classify("/emars/special/1"), ident("special", "1"));
        assert_eq!(reg.classify("/emars/other/1"), ident("other", "1"));
        assert_eq!(reg.classify("/emars/solo"), ident("solo", "only"));
        assert_eq!(reg.classify("/emars/a/b/c"), None);
    }

    #[test]
    fn first_match_with_invalid_name_is_none_not_the_next_rule() {
        let toml = r#"
[[cgroup.roots]]
path = "/emars"
[[cgroup.roots.rules]]
pattern = "{function}/{instance}"
[[cgroup.roots.rules]]
pattern = "*/{instance}"
function = "fallback"
"#;
        let reg = registry(toml);
        assert_eq!(reg.classify("/emars/bad!name/1"), None);
    }

    #[test]
    fn produced_names_are_validated_without_panics() {
        let reg = Registry::new(&roots(&[("/emars", &[])])).unwrap();
        let long = "f".repeat(MAX_FUNCTION_NAME_LEN);
        assert_eq!(reg.classify(&format!("/emars/{long}/1")), ident(&long, "1"));
        assert_eq!(reg.classify(&format!("/emars/{long}x/1")), None);
        for bad in ["a b", "a/b", "é", "a\u{0}b", "a{b}", "fn*"] {
            assert_eq!(reg.classify(&format!("/emars/{bad}/1")), None, "{bad:?}");
        }
        assert_eq!(reg.classify("/emars/fn/bad\ninstance"), None);
        let long_instance = "i".repeat(MAX_INSTANCE_NAME_LEN + 1);
        assert_eq!(reg.classify(&format!("/emars/fn/{long_instance}")), None);
        // Non-ASCII instances are fine: they are opaque labels.
        assert_eq!(reg.classify("/emars/fn/é"), ident("fn", "é"));
    }

    #[test]
    fn optional_regex_group_renders_empty_and_empty_function_is_none() {
        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
regex = '(?:(?P<function>[a-z]+)-)?(?P<instance>[0-9]+)'
"#;
        let reg = registry(toml);
        assert_eq!(reg.classify("/r/abc-12"), ident("abc", "12"));
        assert_eq!(reg.classify("/r/12"), None);
    }

    #[test]
    fn star_matches_within_one_segment_only() {
        let reg = Registry::new(&roots(&[("/r", &["*-{instance}.scope"])]));
        // No {function} capture: the default function template is refused.
        let (key, value, _) = invalid_key(reg.unwrap_err());
        assert_eq!(key, "cgroup.roots[0].rules[0].function");
        assert_eq!(value, "{function}");

        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
pattern = "*{function}.d/x*"
instance = "i"
"#;
        let reg = registry(toml);
        // The star comes first, so it takes all it can and leaves one character.
        assert_eq!(reg.classify("/r/abc.d/x"), ident("c", "i"));
        assert_eq!(reg.classify("/r/abc.d/xyz"), ident("c", "i"));
        assert_eq!(reg.classify("/r/a/bc.d/x"), None);
    }

    #[test]
    fn pattern_literals_are_not_regex() {
        let reg = Registry::new(&roots(&[("/r", &["a.b+({function})/{instance}"])])).unwrap();
        assert_eq!(reg.classify("/r/a.b+(fn)/1"), ident("fn", "1"));
        assert_eq!(reg.classify("/r/aXbb(fn)/1"), None);
    }

    #[test]
    fn regex_is_anchored_even_with_alternation() {
        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
regex = '(?P<function>a)|(?P<instance>b)'
function = "f{function}"
instance = "i{instance}"
"#;
        let reg = registry(toml);
        assert_eq!(reg.classify("/r/a"), ident("fa", "i"));
        assert_eq!(reg.classify("/r/b"), ident("f", "ib"));
        assert_eq!(reg.classify("/r/ab"), None);
        assert_eq!(reg.classify("/r/xa"), None);
        assert_eq!(reg.classify("/r/bx"), None);

        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
regex = '^(?P<function>[a-z]+)/(?P<instance>\d+)$'
"#;
        let reg = registry(toml);
        assert_eq!(reg.classify("/r/fn/12"), ident("fn", "12"));
        assert_eq!(reg.classify("/r/fn/12/x"), None);

        // The shorter group syntax works too.
        let toml = r#"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
regex = '(?<function>[a-z]+)/(?<instance>\d+)'
"#;
        assert_eq!(registry(toml).classify("/r/fn/12"), ident("fn", "12"));
    }

    #[test]
    fn root_path_errors_name_the_key_and_value() {
        let cases: &[(&str, &str)] = &[
            ("/", "whole hierarchy"),
            ("", "whole hierarchy"),
            ("//", "whole hierarchy"),
            ("/a//b", "empty path component"),
            ("/a//", "empty path component"),
            ("a///", "empty path component"),
            ("/a/../b", "\"..\""),
            ("/a/./b", "\"..\""),
            ("/a\nb", "control"),
        ];
        for (path, reason_part) in cases {
            let err = Registry::new(&roots(&[("/ok", &[]), (path, &[])])).unwrap_err();
            let (key, value, reason) = invalid_key(err);
            assert_eq!(key, "cgroup.roots[1].path", "{path:?}");
            assert_eq!(&value, path);
            assert!(reason.contains(reason_part), "{path:?}: {reason}");
        }
        let long = format!("/{}", "x".repeat(emars_common::ROOT_PREFIX_LEN));
        let (key, _, reason) = invalid_key(Registry::new(&roots(&[(&long, &[])])).unwrap_err());
        assert_eq!(key, "cgroup.roots[0].path");
        assert!(reason.contains("128"), "{reason}");
        let fits = format!("/{}", "x".repeat(emars_common::ROOT_PREFIX_LEN - 1));
        assert!(Registry::new(&roots(&[(&fits, &[])])).is_ok());
    }

    #[test]
    fn normalised_root_paths_normalise_to_themselves() {
        // check-config prints the normalised config, which must load back unchanged.
        for path in ["/emars", "emars", "/emars/", "a/b/", "/a/b"] {
            let once = normalize_root_path(path).unwrap();
            assert_eq!(normalize_root_path(&once).as_deref(), Ok(once.as_str()));
        }
    }

    #[test]
    fn overlapping_roots_are_refused() {
        for (a, b) in [
            ("/emars", "/emars/fn"),
            ("/emars/fn", "/emars"),
            ("/emars", "emars/"),
            ("/a/b", "/a/b/c/d"),
        ] {
            let err = Registry::new(&roots(&[(a, &[]), (b, &[])])).unwrap_err();
            let (key, value, reason) = invalid_key(err);
            assert_eq!(key, "cgroup.roots[1].path");
            assert_eq!(value, b);
            assert!(reason.contains("overlaps cgroup.roots[0].path"), "{reason}");
        }
        // Sharing a prefix of characters is not overlapping.
        assert!(Registry::new(&roots(&[("/emars", &[]), ("/emarsx", &[])])).is_ok());
        assert!(Registry::new(&roots(&[("/a/b", &[]), ("/a/c", &[])])).is_ok());
    }

    #[test]
    fn root_count_is_bounded() {
        let (key, value, _) = invalid_key(Registry::new(&[]).unwrap_err());
        assert_eq!((key.as_str(), value.as_str()), ("cgroup.roots", "[]"));
        let names: Vec<String> = (0..=emars_common::MAX_ROOTS)
            .map(|i| format!("/r{i}"))
            .collect();
        let many: Vec<(&str, &[&str])> = names.iter().map(|n| (n.as_str(), &[][..])).collect();
        let (key, value, _) = invalid_key(Registry::new(&roots(&many)).unwrap_err());
        assert_eq!(key, "cgroup.roots");
        assert_eq!(value, "9 roots");
        assert!(Registry::new(&roots(&many[..8])).is_ok());
    }

    /// (pattern, expected fragment of the reason)
    #[test]
    fn pattern_errors_name_the_key_and_value() {
        let cases: &[(&str, &str)] = &[
            ("", "must not be empty"),
            ("/{function}/{instance}", "leading '/'"),
            ("{function}/{instance}/", "end with '/'"),
            ("{function}//{instance}", "empty path segment"),
            ("{function/{instance}", "not a placeholder"),
            ("{function}/{instance", "without a closing"),
            ("{function}}/{instance}", "without an opening"),
            ("{1st}/{function}/{instance}", "not a placeholder"),
            ("{}/{function}/{instance}", "not a placeholder"),
            ("{fn-name}/{function}/{instance}", "not a placeholder"),
            ("{function}/{function}/{instance}", "twice"),
        ];
        for (pattern, reason_part) in cases {
            let err = Registry::new(&roots(&[("/r", &[pattern])])).unwrap_err();
            let (key, value, reason) = invalid_key(err);
            assert_eq!(key, "cgroup.roots[0].rules[0].pattern", "{pattern:?}");
            assert_eq!(&value, pattern);
            assert!(reason.contains(reason_part), "{pattern:?}: {reason}");
        }
    }

    fn rule_error(rule: RuleConfig) -> (String, String, String) {
        let root = RootConfig {
            path: "/r".into(),
            create: true,
            rules: vec![
                RuleConfig {
                    pattern: Some("ok/{function}/{instance}".into()),
                    ..RuleConfig::default()
                },
                rule,
            ],
        };
        invalid_key(Registry::new(&[root]).unwrap_err())
    }

    #[test]
    fn regex_errors_name_the_key_and_value() {
        for (regex, reason_part) in [
            ("(unclosed", "unclosed group"),
            ("(?P<function>a", "unclosed group"),
            ("(?P<x>a)(?P<x>b)", "duplicate"),
            ("", "must not be empty"),
            ("/(?P<function>.+)/(?P<instance>.+)", "leading '/'"),
            ("^/(?P<function>.+)/(?P<instance>.+)", "leading '/'"),
        ] {
            let (key, value, reason) = rule_error(RuleConfig {
                regex: Some(regex.into()),
                ..RuleConfig::default()
            });
            assert_eq!(key, "cgroup.roots[0].rules[1].regex", "{regex:?}");
            assert_eq!(value, regex);
            assert!(reason.contains(reason_part), "{regex:?}: {reason}");
        }
    }

    #[test]
    fn a_rule_has_exactly_one_of_pattern_or_regex() {
        let (key, value, reason) = rule_error(RuleConfig {
            pattern: Some("{function}/{instance}".into()),
            regex: Some("(?P<function>.+)".into()),
            ..RuleConfig::default()
        });
        assert_eq!(key, "cgroup.roots[0].rules[1].regex");
        assert_eq!(value, "(?P<function>.+)");
        assert!(reason.contains("exactly one"), "{reason}");

        let (key, value, reason) = rule_error(RuleConfig {
            function: Some("docker".into()),
            ..RuleConfig::default()
        });
        assert_eq!(key, "cgroup.roots[0].rules[1]");
        assert_eq!(value, "{ function = \"docker\" }");
        assert!(reason.contains("pattern or a regex"), "{reason}");

        let (_, value, _) = rule_error(RuleConfig::default());
        assert_eq!(value, "{}");
    }

    #[test]
    fn template_errors_name_the_key_and_value() {
        let cases: &[(&str, &str, &str, &str)] = &[
            // (function, instance, failing key suffix, reason fragment)
            ("{app}", "{instance}", "function", "uses {app}"),
            ("{function}", "{pod}", "instance", "uses {pod}"),
            ("", "{instance}", "function", "must not be empty"),
            ("{function}", "", "instance", "must not be empty"),
            ("my fn", "{instance}", "function", "' ' cannot appear"),
            (
                "fn/{function}",
                "{instance}",
                "function",
                "'/' cannot appear",
            ),
            ("é{function}", "{instance}", "function", "'é' cannot appear"),
            ("{function", "{instance}", "function", "without a closing"),
            (
                "{function}",
                "{instance}}",
                "instance",
                "without an opening",
            ),
            ("{function}", "a\tb{instance}", "instance", "control"),
            ("x*", "{instance}", "function", "'*' cannot appear"),
        ];
        for (function, instance, which, reason_part) in cases {
            let (key, value, reason) = rule_error(RuleConfig {
                pattern: Some("{function}/{instance}".into()),
                function: Some(function.to_string()),
                instance: Some(instance.to_string()),
                ..RuleConfig::default()
            });
            assert_eq!(key, format!("cgroup.roots[0].rules[1].{which}"));
            let want = if *which == "function" {
                function
            } else {
                instance
            };
            assert_eq!(&value, want);
            assert!(
                reason.contains(reason_part),
                "{function:?} {instance:?}: {reason}"
            );
        }
        let long = "f".repeat(MAX_FUNCTION_NAME_LEN + 1);
        let (key, _, reason) = rule_error(RuleConfig {
            pattern: Some("{instance}".into()),
            function: Some(long),
            ..RuleConfig::default()
        });
        assert_eq!(key, "cgroup.roots[0].rules[1].function");
        assert!(reason.contains("128"), "{reason}");
    }

    #[test]
    fn template_error_lists_the_captures() {
        let (_, _, reason) = rule_error(RuleConfig {
            regex: Some("(?P<app>[a-z]+)-(?P<n>[0-9]+)".into()),
            ..RuleConfig::default()
        });
        assert!(reason.contains("it captures {app}, {n}"), "{reason}");
        let (_, _, reason) = rule_error(RuleConfig {
            pattern: Some("fixed".into()),
            ..RuleConfig::default()
        });
        assert!(reason.contains("it captures nothing"), "{reason}");
    }

    #[test]
    fn fixed_templates_and_composite_templates() {
        let toml = r##"
[[cgroup.roots]]
path = "/r"
[[cgroup.roots.rules]]
regex = '(?P<app>[a-z]+)_(?P<fn>[a-z]+)/(?P<i>\d+)'
function = "{app}-{fn}"
instance = "#{i}"
"##;
        let reg = registry(toml);
        assert_eq!(reg.classify("/r/shop_cart/3"), ident("shop-cart", "#3"));
    }

    #[test]
    fn filesystem_paths_are_refused_with_the_root_they_mean() {
        for (path, meant) in [
            ("/sys/fs/cgroup/memory/emars-x", Some("\"/emars-x\"")),
            ("/sys/fs/cgroup/emars-x/", Some("\"/emars-x\"")),
            ("sys/fs/cgroup/unified/a/b", Some("\"/a/b\"")),
            ("/sys/fs/cgroup/memory", None),
            ("/sys/fs/cgroup", None),
        ] {
            let why = normalize_root_path(path).expect_err(path);
            assert!(why.contains("filesystem path"), "{path}: {why}");
            if let Some(meant) = meant {
                assert!(why.contains(meant), "{path}: {why}");
            }
        }
        // Only a path under the mount itself.
        assert_eq!(
            normalize_root_path("/sys/fs/cgroupx/a").as_deref(),
            Ok("/sys/fs/cgroupx/a")
        );
        assert_eq!(
            normalize_root_path("/kubepods.slice").as_deref(),
            Ok("/kubepods.slice")
        );
    }

    #[test]
    fn unusable_names_say_why() {
        assert_eq!(Unnamed::check("fn", "i"), None);
        assert_eq!(Unnamed::check("", "i"), Some(Unnamed::FunctionEmpty));
        assert_eq!(
            Unnamed::check("a b", "i"),
            Some(Unnamed::FunctionCharacters)
        );
        assert_eq!(
            Unnamed::check("café", "i"),
            Some(Unnamed::FunctionCharacters)
        );
        assert_eq!(
            Unnamed::check("$(id)", "i"),
            Some(Unnamed::FunctionCharacters)
        );
        assert_eq!(
            Unnamed::check(&"f".repeat(129), "i"),
            Some(Unnamed::FunctionTooLong)
        );
        assert_eq!(Unnamed::check("f", ""), Some(Unnamed::InstanceEmpty));
        assert_eq!(
            Unnamed::check("f", "a\tb"),
            Some(Unnamed::InstanceCharacters)
        );
        assert_eq!(
            Unnamed::check("f", &"i".repeat(256)),
            Some(Unnamed::InstanceTooLong)
        );
        // Each reason has its own label, and ALL lists them in discriminant order.
        for (i, why) in Unnamed::ALL.iter().enumerate() {
            assert_eq!(*why as usize, i);
        }
        let registry = Registry::new(&roots(&[("/emars", &["{function}/{instance}"])])).unwrap();
        let got = registry.classify_with("/emars/a b/1", &mut |_| MetadataRead::Absent, false);
        assert_eq!(got, Classified::Unnamed(Unnamed::FunctionCharacters));
        // No rule matching is not an unusable name: the function's own directory, say.
        let got = registry.classify_with("/emars/fn", &mut |_| MetadataRead::Absent, false);
        assert_eq!(got, Classified::NotInstance);
    }

    #[test]
    fn registry_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Registry>();
        assert_send_sync::<CgroupTable>();
    }

    #[test]
    fn cgroup_table_indexes_by_id_and_path() {
        let mut table = CgroupTable::default();
        assert!(table.is_empty());
        table.insert(10, "/emars/a/1".into(), ident("a", "1"), 100);
        table.insert(11, "/emars/a".into(), None, 90);
        assert_eq!(table.len(), 2);
        assert_eq!(table.by_path("/emars/a/1"), Some(10));
        assert_eq!(table.by_path("/emars/a"), Some(11));
        assert_eq!(table.by_path("/emars/b"), None);
        assert_eq!(table.get(10).unwrap().identity, ident("a", "1"));
        assert_eq!(table.get(10).unwrap().started_at_ms, 100);
        table.get_mut(11).unwrap().started_at_ms = 95;
        assert_eq!(table.get(11).unwrap().started_at_ms, 95);
        let ids: Vec<u64> = table.iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![10, 11]);

        let removed = table.remove(10).unwrap();
        assert_eq!(removed.rel_path, "/emars/a/1");
        assert_eq!(table.by_path("/emars/a/1"), None);
        assert!(table.get(10).is_none());
        assert!(table.remove(10).is_none());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn cgroup_table_reinsert_moves_the_path_index() {
        let mut table = CgroupTable::default();
        table.insert(1, "/emars/a/1".into(), None, 0);
        // Same id, new path (a rename): the old path no longer resolves.
        table.insert(1, "/emars/a/2".into(), None, 0);
        assert_eq!(table.by_path("/emars/a/1"), None);
        assert_eq!(table.by_path("/emars/a/2"), Some(1));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn cgroup_table_recreated_path_keeps_the_old_entry_until_removed() {
        let mut table = CgroupTable::default();
        table.insert(1, "/emars/a/1".into(), ident("a", "1"), 0);
        // Removed and re-created under a new id before the removal was seen.
        table.insert(2, "/emars/a/1".into(), ident("a", "1"), 5);
        assert_eq!(table.by_path("/emars/a/1"), Some(2));
        assert_eq!(table.len(), 2);
        // Removing the stale id must not unlink the live one's path.
        assert_eq!(table.remove(1).unwrap().id, 1);
        assert_eq!(table.by_path("/emars/a/1"), Some(2));
    }

    #[test]
    fn cgroup_table_by_path_ignores_paths_edited_in_place() {
        let mut table = CgroupTable::default();
        table.insert(1, "/emars/a/1".into(), None, 0);
        table.get_mut(1).unwrap().rel_path = "/elsewhere".into();
        assert_eq!(table.by_path("/emars/a/1"), None);
    }
}

/// A watched sub-tree of the memory hierarchy and the rules that name its cgroups.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RootConfig {
    /// Relative to the hierarchy root, as the kernel reports it: `/emars`. Normalised at load.
    pub path: String,
    /// Tried in order; empty means the default rule `{function}/{instance}`.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Whether the agent creates the root when it is missing (EMARS's own root, where a
    /// platform creates instances); false for a root a platform or runtime makes
    /// (kubepods.slice, docker): a missing one is then reported, never created.
    #[serde(default = "create_by_default")]
    pub create: bool,
}

fn create_by_default() -> bool {
    true
}

/// How to read a function and an instance out of a path below a root (see docs/config.md).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Template; None means `{function}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Template; None means `{instance}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The container's metadata file (a template over the captures), whose labels the
    /// function and instance templates may name as `{label:KEY}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
}
