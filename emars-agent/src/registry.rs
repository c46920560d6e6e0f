//! Which function and instance a cgroup belongs to, and the table of cgroups the agent tracks.
//!
//! The platform encodes its sandboxes in cgroup paths (`<root>/<function>/<instance>` by default);
//! the `[[cgroup.roots]]` rules of the config (see docs/config.md) say how to read them. Rules are
//! compiled once, at start-up, so that a bad rule stops the agent with a message naming the key
//! instead of silently never matching.

use std::collections::{BTreeMap, HashMap};

use regex::{Captures, Regex};
use serde::Serialize;

use crate::config::{ConfigError, RootConfig, RuleConfig};

/// Longest function name; it ends up in API URLs and store keys.
pub const MAX_FUNCTION_NAME_LEN: usize = 128;
/// Longest instance name (a cgroup directory name is at most 255 bytes too).
pub const MAX_INSTANCE_NAME_LEN: usize = 255;
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

/// True for 1..=128 characters of `[A-Za-z0-9._:-]`: safe in URLs, file names and store keys
/// without escaping. The API applies the same rule to names it is sent.
pub fn valid_function_name(name: &str) -> bool {
    (1..=MAX_FUNCTION_NAME_LEN).contains(&name.len()) && name.bytes().all(is_function_byte)
}

fn is_function_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

/// Instances are opaque labels; they only need to be printable and bounded.
fn valid_instance_name(name: &str) -> bool {
    (1..=MAX_INSTANCE_NAME_LEN).contains(&name.len()) && !name.chars().any(char::is_control)
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
        return Err("a root cannot be the whole hierarchy: name a sub-directory such as /emars"
            .to_string());
    }
    if p.contains("//") {
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
            "is {} bytes long; the kernel-side root table holds at most {}",
            p.len(),
            emars_common::ROOT_PREFIX_LEN
        ));
    }
    Ok(p)
}

/// One piece of a pattern or template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `{name}`: in a pattern it captures, in a template it is replaced.
    Placeholder(String),
    /// `*` in a pattern: any text inside one path segment.
    Star,
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
                re.push_str(&format!("(?P<{name}>[^/]+)"));
                names.push(name);
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
            "matches the path relative to the root, which has no leading '/': drop it"
                .to_string(),
        );
    }
    // Compiled alone first so that the error points into the user's text, not our wrapper.
    Regex::new(source).map_err(|e| e.to_string())?;
    // The group keeps an alternation such as `a|b` anchored as a whole.
    let regex = Regex::new(&format!("^(?:{source})$")).map_err(|e| e.to_string())?;
    let names = regex.capture_names().flatten().map(str::to_string).collect();
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
    fn compile(text: &str, captures: &[String], is_function: bool) -> Result<Template, String> {
        if text.is_empty() {
            return Err("must not be empty".to_string());
        }
        let tokens = tokenize(text, false)?;
        let mut literal_len = 0;
        for token in &tokens {
            match token {
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
            return Err(format!("is longer than the {max}-character limit"));
        }
        Ok(Template { tokens })
    }

    fn render(&self, caps: &Captures<'_>) -> String {
        let mut out = String::new();
        for token in &self.tokens {
            match token {
                Token::Literal(text) => out.push_str(text),
                // A group that did not take part in the match renders as nothing.
                Token::Placeholder(name) => {
                    out.push_str(caps.name(name).map_or("", |m| m.as_str()))
                }
                Token::Star => out.push('*'),
            }
        }
        out
    }
}

#[derive(Debug)]
struct Rule {
    matcher: Regex,
    function: Template,
    instance: Template,
}

impl Rule {
    /// `key` is the rule's config key, e.g. `cgroup.roots[0].rules[1]`.
    fn compile(rule: &RuleConfig, key: &str) -> Result<Rule, ConfigError> {
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
        let function_text = rule.function.as_deref().unwrap_or(DEFAULT_FUNCTION_TEMPLATE);
        let function = Template::compile(function_text, &captures, true)
            .map_err(|reason| invalid(format!("{key}.function"), function_text, reason))?;
        let instance_text = rule.instance.as_deref().unwrap_or(DEFAULT_INSTANCE_TEMPLATE);
        let instance = Template::compile(instance_text, &captures, false)
            .map_err(|reason| invalid(format!("{key}.instance"), instance_text, reason))?;
        Ok(Rule {
            matcher,
            function,
            instance,
        })
    }

    /// `Some(None)`: the rule matched but produced an unusable name.
    fn apply(&self, rest: &str) -> Option<Option<Identity>> {
        let caps = self.matcher.captures(rest)?;
        let function = self.function.render(&caps);
        let instance = self.instance.render(&caps);
        if valid_function_name(&function) && valid_instance_name(&instance) {
            Some(Some(Identity { function, instance }))
        } else {
            Some(None)
        }
    }
}

fn invalid(key: String, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
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
    pub fn new(roots: &[RootConfig]) -> Result<Registry, ConfigError> {
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

    /// The identity given by the first rule of the containing root that matches. None for a
    /// root itself, for paths outside all roots, when no rule matches, and when the first
    /// matching rule yields an invalid function or instance name.
    pub fn classify(&self, rel_path: &str) -> Option<Identity> {
        let (root, rest) = self.locate(rel_path)?;
        if rest.is_empty() {
            return None;
        }
        root.rules.iter().find_map(|rule| rule.apply(rest)).flatten()
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
