use super::*;
use crate::policy::{Action, Rule, Values};

fn path(text: &str) -> CgroupPath {
    CgroupPath::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn rule(name: &str, cgroup: &str) -> Rule {
    Rule {
        name: name.into(),
        line: 0,
        cgroup: Some(path(cgroup)),
        remote: Vec::new(),
        remote_ports: Vec::new(),
        local_ports: Vec::new(),
        direction: None,
        containers: None,
        action: Action::enforce(Values::default()),
    }
}

fn policy(scopes: &[&str], rules: Vec<Rule>) -> Policy {
    Policy {
        rules,
        ..Policy::enforce(Values::default(), scopes.iter().map(|s| path(s)).collect())
    }
}

/// A host whose cgroups are `existing`; resolving `broken` fails.
struct Host {
    existing: Vec<&'static str>,
    broken: Option<&'static str>,
}

impl Hierarchy for Host {
    type Cgroup = String;
    type Error = String;

    fn expand(&self, pattern: &CgroupPath) -> Vec<CgroupPath> {
        self.existing
            .iter()
            .map(|p| path(p))
            .filter(|p| pattern.matches(p))
            .collect()
    }

    fn resolve(&self, cgroup: &CgroupPath) -> Result<Option<String>, String> {
        if self.broken == Some(cgroup.as_str()) {
            return Err(format!("cannot read {cgroup}"));
        }
        Ok(self
            .existing
            .contains(&cgroup.as_str())
            .then(|| format!("id of {cgroup}")))
    }
}

fn keys<C>(map: &BTreeMap<CgroupPath, C>) -> Vec<&str> {
    map.keys().map(CgroupPath::as_str).collect()
}

#[test]
fn nested_enforced_cgroups_attach_once_at_the_outermost() {
    let host = Host {
        existing: vec!["/", "/a", "/a/b", "/c"],
        broken: None,
    };
    let plan = attach_points(&policy(&["/a/b", "/a", "/c"], vec![]), &host)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(keys(&plan.enforced), ["/a", "/c"]);
    assert_eq!(keys(&plan.attachments), ["/a", "/c"]);
    assert_eq!(plan.attachments[&path("/a")], "id of /a");
    assert!(plan.missing.is_empty());
}

#[test]
fn rule_cgroups_attach_inside_enforced_ones_only() {
    let host = Host {
        existing: vec!["/", "/a", "/a/b", "/c"],
        broken: None,
    };
    let rules = vec![rule("in", "/a/b"), rule("self", "/a"), rule("out", "/c")];
    let plan = attach_points(&policy(&["/a"], rules), &host).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(keys(&plan.enforced), ["/a"]);
    assert_eq!(
        keys(&plan.attachments),
        ["/a", "/a/b"],
        "the rule outside every enforced cgroup never applies: no attachment"
    );
}

#[test]
fn cgroups_that_do_not_exist_are_reported_not_fatal() {
    let host = Host {
        existing: vec!["/", "/a"],
        broken: None,
    };
    let rules = vec![rule("gone", "/a/x"), rule("also", "/a/x")];
    let plan =
        attach_points(&policy(&["/a", "/z"], rules), &host).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(keys(&plan.attachments), ["/a"]);
    assert_eq!(
        plan.missing,
        [
            ("enforced cgroup".to_string(), path("/z")),
            ("gone".to_string(), path("/a/x")),
            ("also".to_string(), path("/a/x")),
        ]
    );
}

#[test]
fn a_cgroup_that_cannot_be_read_is_an_error() {
    let host = Host {
        existing: vec!["/", "/a", "/a/b"],
        broken: Some("/a/b"),
    };
    let error = attach_points(&policy(&["/a"], vec![rule("r", "/a/b")]), &host).err();
    assert_eq!(error.as_deref(), Some("cannot read /a/b"));
}

#[test]
fn patterns_expand_to_the_cgroups_that_exist() {
    let host = Host {
        existing: vec!["/", "/k", "/k/pod1", "/k/pod1/c", "/k/pod2", "/other"],
        broken: None,
    };
    let rules = vec![rule("in pod1", "/k/pod1/c"), rule("no pod3", "/k/pod3/c")];
    let plan = attach_points(&policy(&["/k/pod*"], rules), &host).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(keys(&plan.enforced), ["/k/pod1", "/k/pod2"]);
    assert_eq!(keys(&plan.attachments), ["/k/pod1", "/k/pod1/c", "/k/pod2"]);
    assert!(
        plan.missing.is_empty(),
        "a rule cgroup under no match is outside, not missing: {:?}",
        plan.missing
    );
}

#[test]
fn named_plans_as_if_every_named_cgroup_existed() {
    let p = policy(
        &["/k/**/app", "/svc"],
        vec![rule("deep", "/k/x/app/y"), rule("svc", "/svc/a")],
    );
    assert_eq!(
        named_attach_points(&p),
        [
            path("/k/x/app"),
            path("/k/x/app/y"),
            path("/svc"),
            path("/svc/a")
        ],
        "the pattern matches the ancestor the rule names"
    );
    let mut named = Named::of(&p);
    named.extend([path("/k/z/app")]);
    let Ok(plan) = attach_points(&p, &named);
    assert_eq!(
        keys(&plan.enforced),
        ["/k/x/app", "/k/z/app", "/svc"],
        "cgroups added by hand"
    );
}
