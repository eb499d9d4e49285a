use super::*;
use crate::policy::{Action, Rule, Values};

fn path(text: &str) -> CgroupPath {
    CgroupPath::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn rule(name: &str, cgroup: &str) -> Rule {
    Rule {
        cgroup: Some(path(cgroup)),
        ..Rule::new(name, Action::enforce(Values::default()))
    }
}

fn policy(scopes: &[&str], rules: Vec<Rule>) -> Policy {
    Policy {
        rules,
        ..Policy::enforce(Values::default(), scopes.iter().map(|s| path(s)).collect())
    }
}

/// A host whose cgroups are `existing`; finding `broken` fails.
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

    fn find(&self, cgroup: &CgroupPath) -> Result<Option<String>, String> {
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
    assert!(plan.absent.is_empty());
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
        plan.absent,
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
        plan.absent.is_empty(),
        "a rule cgroup under no match is outside, not absent: {:?}",
        plan.absent
    );
}

#[test]
fn the_lock_attaches_once_above_a_patterns_matches() {
    let host = Host {
        existing: vec![
            "/", "/k", "/k/pod1", "/k/pod2", "/k/sub", "/k/sub/x", "/svc",
        ],
        broken: None,
    };
    let plan = attach_points(
        &policy(&["/k/pod*", "/k/sub/*", "/svc", "/gone/*"], vec![]),
        &host,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        keys(&plan.enforced),
        ["/k/pod1", "/k/pod2", "/k/sub/x", "/svc"]
    );
    assert_eq!(
        keys(&plan.locks),
        ["/k", "/svc"],
        "one lock per literal prefix, the nested one dropped, the absent one skipped"
    );
    let none =
        attach_points(&policy(&["/k/none-*"], vec![]), &host).unwrap_or_else(|e| panic!("{e}"));
    assert!(none.enforced.is_empty());
    assert_eq!(
        keys(&none.locks),
        ["/k"],
        "held before the first match: a new one needs no lock of its own"
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

mod new_cgroups {
    use proptest::prelude::*;

    use super::*;

    fn component() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "c1", "c2"])
    }

    fn cgroup() -> impl Strategy<Value = CgroupPath> {
        prop::collection::vec(component(), 1..4).prop_map(|parts| path(&parts.join("/")))
    }

    fn scope() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "c1", "c*", "*", "**"]),
            1..4,
        )
        .prop_map(|parts| format!("/{}", parts.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Deciding what a new cgroup changes without planning agrees with planning again.
        #[test]
        fn agrees_with_planning_again(
            tree in prop::collection::vec(cgroup(), 0..12),
            scopes in prop::collection::vec(scope(), 1..3),
            rules in prop::collection::vec(
                prop::collection::vec(prop::sample::select(vec!["a", "c1", "n"]), 1..4)
                    .prop_map(|parts| path(&parts.join("/"))),
                0..3,
            ),
            parent in prop::collection::vec(component(), 0..3),
            leaf in prop::sample::select(vec!["n", "c9"]),
        ) {
            let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
            let rules = rules
                .iter()
                .enumerate()
                .map(|(i, cgroup)| rule(&format!("r{i}"), cgroup.as_str()))
                .collect();
            let policy = policy(&scopes, rules);
            let mut before = Named::default();
            before.extend(tree);
            // A new cgroup's parent exists; the cgroup does not yet (no cgroup of the tree
            // has its name).
            let new = path(&format!("{}/{leaf}", parent.join("/")));
            before.extend([path(&parent.join("/"))]);
            let mut after = before.clone();
            after.extend([new.clone()]);
            let Ok(old) = attach_points(&policy, &before);
            let Ok(now) = attach_points(&policy, &after);
            let mut grown = old.clone();
            match new_cgroup(&policy, |at| old.attachments.contains_key(at), &new) {
                NewCgroup::Replan => {}
                NewCgroup::Nothing => prop_assert_eq!(&now, &old),
                NewCgroup::Attach => {
                    grown.attachments.insert(new.clone(), ());
                    grown.enforced.insert(new.clone(), ());
                    prop_assert_eq!(&now, &grown);
                }
            }
        }
    }

    #[test]
    fn a_container_under_a_pattern_is_attached_and_its_children_are_not() {
        let p = policy(&["/k/pod*"], vec![rule("named", "/k/pod9")]);
        let attached = |at: &str| at == "/k/pod1";
        assert_eq!(
            new_cgroup(&p, attached, &path("/k/pod2")),
            NewCgroup::Attach
        );
        assert_eq!(
            new_cgroup(&p, attached, &path("/k/pod1/c")),
            NewCgroup::Nothing
        );
        assert_eq!(
            new_cgroup(&p, attached, &path("/other")),
            NewCgroup::Nothing
        );
        assert_eq!(
            new_cgroup(&p, attached, &path("/k/pod9")),
            NewCgroup::Replan
        );
    }
}
