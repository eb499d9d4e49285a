//! Cgroup paths as policies name them: one cgroup, or a glob pattern of many.

use std::fmt;

use super::Pattern;

/// A cgroup path inside the hierarchy, normalised: `/` or `/a/b` (as /proc/PID/cgroup shows).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(pub(super) String);

/// Maps keyed by paths are looked up by text (the derived order and hash are the text's).
impl std::borrow::Borrow<str> for CgroupPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl CgroupPath {
    /// The root of the hierarchy.
    pub fn root() -> Self {
        Self("/".into())
    }

    /// Normalises `text` (leading slash optional, no `.` or `..`, no empty components).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        for part in text.split('/').filter(|part| !part.is_empty()) {
            if part == "." || part == ".." {
                return Err(format!(
                    "{text:?}: `.` and `..` are not allowed in a cgroup path"
                ));
            }
            parts.push(part);
        }
        Ok(Self(format!("/{}", parts.join("/"))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Components below the root.
    pub fn depth(&self) -> usize {
        self.0.split('/').filter(|part| !part.is_empty()).count()
    }

    /// Whether `self` is `other` or one of its ancestors.
    pub fn contains(&self, other: &Self) -> bool {
        self.0 == "/"
            || other.0 == self.0
            || (other.0.starts_with(&self.0) && other.0.as_bytes().get(self.0.len()) == Some(&b'/'))
    }

    /// Whether a proper ancestor of this path is in `paths` (by text): a lookup per level, so
    /// that keeping the outermost of N paths costs N × depth, not N².
    pub fn nested_in(&self, paths: &std::collections::HashSet<&str>) -> bool {
        self.ancestors().any(|ancestor| paths.contains(ancestor))
    }

    /// The proper ancestors, as text, from the root down (`/a/b`: `/`, `/a`).
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        let below_root = (self.0 != "/").then(|| {
            self.0
                .match_indices('/')
                .skip(1)
                .map(|(end, _)| &self.0[..end])
        });
        (self.0 != "/")
            .then_some("/")
            .into_iter()
            .chain(below_root.into_iter().flatten())
    }

    /// The path relative to the root, for joining to the mount point.
    pub fn relative(&self) -> &str {
        self.0.trim_start_matches('/')
    }

    pub(super) fn components(&self) -> Vec<&str> {
        self.0.split('/').filter(|part| !part.is_empty()).collect()
    }

    /// Whether this is a glob pattern (`*`, `?` in a component, `**` for any depth) rather
    /// than one cgroup.
    pub fn is_pattern(&self) -> bool {
        self.0.contains(['*', '?'])
    }

    /// The longest leading part without wildcards: where a pattern's matches live.
    pub fn literal_prefix(&self) -> Self {
        let literal: Vec<&str> = self
            .components()
            .into_iter()
            .take_while(|part| !part.contains(['*', '?']))
            .collect();
        Self(format!("/{}", literal.join("/")))
    }

    /// Whether the pattern (or plain path) matches `path` exactly (compiled once per thread).
    pub fn matches(&self, path: &Self) -> bool {
        compiled(self, |pattern| pattern.matches(path))
    }

    /// Whether connections of `cgroup` are covered: a plain path covers itself and its
    /// descendants, a pattern every cgroup it matches and their descendants.
    pub fn covers(&self, cgroup: &Self) -> bool {
        if !self.is_pattern() {
            return self.contains(cgroup);
        }
        compiled(self, |pattern| pattern.covers(cgroup))
    }
}

/// Patterns compiled once per thread: `covers` runs per connection in `decide` (scan, the
/// sweeps, the count of connections without keepalive), and compiling a pattern (a globset
/// automaton per component) costs far more than matching it. Policies hold a few patterns;
/// the cache is emptied when it holds more than [`COMPILED_MAX`] (reloads with ever new ones).
fn compiled<T>(pattern: &CgroupPath, with: impl FnOnce(&Pattern) -> T) -> T {
    thread_local! {
        static COMPILED: std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<Pattern>>> =
            std::cell::RefCell::default();
    }
    let compiled = COMPILED.with_borrow_mut(|cache| {
        if let Some(known) = cache.get(pattern.as_str()) {
            return std::rc::Rc::clone(known);
        }
        if cache.len() >= COMPILED_MAX {
            cache.clear();
        }
        let new = std::rc::Rc::new(Pattern::new(pattern));
        cache.insert(pattern.0.clone(), std::rc::Rc::clone(&new));
        new
    });
    with(&compiled)
}

const COMPILED_MAX: usize = 256;

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::CgroupPath;

    fn path(text: &str) -> CgroupPath {
        CgroupPath::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn ancestors_are_the_proper_ones_from_the_root_down() {
        let list = |text: &str| {
            path(text)
                .ancestors()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(list("/a/b/c"), ["/", "/a", "/a/b"]);
        assert_eq!(list("/a"), ["/"]);
        assert!(list("/").is_empty());
    }

    #[test]
    fn nested_in_looks_only_at_proper_ancestors() {
        let set: HashSet<&str> = ["/a", "/x/y"].into_iter().collect();
        assert!(path("/a/b").nested_in(&set));
        assert!(path("/a/b/c").nested_in(&set));
        assert!(path("/x/y/z").nested_in(&set));
        assert!(!path("/a").nested_in(&set), "itself is no ancestor");
        assert!(
            !path("/ab").nested_in(&set),
            "a prefix of the text is no ancestor"
        );
        assert!(!path("/x").nested_in(&set));
        assert!(!path("/").nested_in(&set));
        let root: HashSet<&str> = ["/"].into_iter().collect();
        assert!(path("/a").nested_in(&root));
        assert!(!path("/").nested_in(&root));
    }
}
