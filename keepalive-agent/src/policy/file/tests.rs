use super::*;
use crate::policy::{Action, CgroupPath, Cidr, Direction, Mode, PortRange, Values};

const EXAMPLE: &str = include_str!("../../../../examples/policy.toml");

fn parsed(text: &str) -> Policy {
    parse(Path::new("test.toml"), text).unwrap_or_else(|e| panic!("{e}"))
}

/// The error for `text`, which must be refused.
fn refused(text: &str) -> String {
    match parse(Path::new("test.toml"), text) {
        Ok(policy) => panic!("accepted: {policy:?}"),
        Err(error) => error.to_string(),
    }
}

fn assert_refused(text: &str, line: usize, expected: &[&str]) {
    let error = refused(text);
    assert!(
        error.starts_with(&format!("test.toml:{line}:")),
        "error should point at line {line}: {error}"
    );
    for part in expected {
        assert!(
            error.contains(part),
            "error should mention {part:?}: {error}"
        );
    }
}

#[test]
fn the_example_parses_into_what_it_says() {
    let policy = parsed(EXAMPLE);
    assert_eq!(policy.scopes, vec![CgroupPath::root()]);
    assert!(policy.existing);
    assert_eq!(policy.default, Action::enforce(Values::default()));
    let names: Vec<&str> = policy.rules.iter().map(|rule| rule.name.as_str()).collect();
    assert_eq!(names, ["nat-gateway", "payments-db", "ssh", "batch-cap"]);

    let nat = &policy.rules[0];
    assert_eq!(
        nat.remote,
        vec![Cidr::parse("203.0.113.0/24").unwrap_or_else(|e| panic!("{e}"))]
    );
    assert_eq!(nat.direction, Some(Direction::Outbound));
    assert_eq!(
        nat.action.values,
        Values {
            idle_secs: 240,
            interval_secs: 15,
            count: 4,
            user_timeout_ms: None
        }
    );
    let db = &policy.rules[1];
    assert_eq!(
        db.cgroup.as_ref().map(CgroupPath::as_str),
        Some("/system.slice/payments.service")
    );
    assert_eq!(db.remote.len(), 2);
    assert_eq!(
        db.remote_ports,
        vec![PortRange {
            first: 5432,
            last: 5432
        }]
    );
    assert_eq!(db.action.values.user_timeout_ms, Some(30_000));
    assert_eq!(policy.rules[2].action.mode, Mode::Exempt);
    let batch = &policy.rules[3];
    assert_eq!(batch.action.mode, Mode::Cap);
    assert_eq!(
        (
            batch.action.values.idle_secs,
            batch.action.values.interval_secs
        ),
        (300, 5),
        "omitted values come from [default]"
    );
    assert!(batch.line > nat.line, "lines are recorded");
}

#[test]
fn an_empty_default_table_is_the_built_in_default_everywhere() {
    let policy = parsed("[default]\n");
    assert_eq!(
        policy,
        Policy::enforce(Values::default(), vec![CgroupPath::root()])
    );
}

#[test]
fn an_empty_file_is_refused_it_is_more_likely_a_write_caught_half_way() {
    for text in ["", "\n", "  \n\t\n"] {
        assert_refused(text, 1, &["the file is empty", "[default]"]);
    }
}

#[test]
fn ends_is_inherited_from_the_default_and_set_per_rule_and_reaches_the_record() {
    let policy = parsed(
        "[default]\nends = true\n[[rule]]\nremote_port = 80\n[[rule]]\nremote_port = 81\n\
         ends = false\n",
    );
    assert!(policy.default.ends && policy.rules[0].action.ends);
    assert!(!policy.rules[1].action.ends);
    assert_ne!(
        policy.rules[0].action.record(1).flags & keepalive_common::RULE_ENDS,
        0
    );
    assert_eq!(
        policy.rules[1].action.record(2).flags & keepalive_common::RULE_ENDS,
        0
    );
    assert!(
        !parsed("[default]\nidle = \"9s\"\n").default.ends,
        "off unless asked for"
    );
    assert_refused("[default]\nends = 1\n", 2, &["field `ends`", "a boolean"]);
}

#[test]
fn rules_inherit_mode_and_values_from_the_default() {
    let policy = parsed(
        "[default]\nmode = \"audit\"\nidle = \"2m\"\nuser_timeout = \"1500ms\"\nlock = false\n\
         [[rule]]\nremote_port = \"8000-8099\"\ncount = 9\n",
    );
    let rule = &policy.rules[0];
    assert_eq!(rule.name, "rule 1");
    assert_eq!(rule.action.mode, Mode::Audit);
    assert!(!rule.action.lock);
    assert_eq!(
        rule.action.values,
        Values {
            idle_secs: 120,
            interval_secs: 5,
            count: 9,
            user_timeout_ms: Some(1500)
        }
    );
    assert_eq!(
        rule.remote_ports,
        vec![PortRange {
            first: 8000,
            last: 8099
        }]
    );
}

#[test]
fn durations_read_like_people_write_them() {
    assert_eq!(parse_duration("45s"), Ok(45_000));
    assert_eq!(parse_duration("5m"), Ok(300_000));
    assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
    assert_eq!(parse_duration("1500ms"), Ok(1500));
    for bad in [
        "",
        "5",
        "5 minutes",
        "m5",
        "1.5s",
        "-3s",
        "99999999999999999999h",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn out_of_range_values_name_field_line_and_range() {
    assert_refused(
        "[default]\ncount = 200\n",
        2,
        &["default: count = 200", "1..=127", "TCP_KEEPCNT"],
    );
    assert_refused("[default]\ncount = -1\n", 2, &["`count`", "1..=127"]);
    assert_refused(
        "[[rule]]\nname = \"x\"\nidle = \"10h\"\n",
        3,
        &["rule \"x\"", "idle = 36000 s", "1..=32767"],
    );
    assert_refused(
        "[default]\ninterval = \"0s\"\n",
        2,
        &["interval = 0 s", "1..=32767"],
    );
    assert_refused(
        "[default]\nuser_timeout = \"600h\"\n",
        2,
        &["user_timeout = 2160000000 ms", "0..=2147483647"],
    );
    assert_refused(
        "[default]\nidle = \"1500ms\"\n",
        2,
        &["`idle`", "whole number of seconds"],
    );
    assert_refused("[default]\nidle = 60\n", 2, &["`idle`", "no unit"]);
    assert_refused(
        "[default]\ncount = \"3\"\n",
        2,
        &["`count`", "not a whole number"],
    );
}

#[test]
fn unknown_keys_are_errors_not_ignored() {
    assert_refused("[default]\nidel = \"60s\"\n", 2, &["idel"]);
    assert_refused("[[rule]]\nremote_ports = 22\n", 2, &["remote_ports"]);
    assert_refused("[defaults]\n", 1, &["defaults"]);
}

#[test]
fn match_keys_are_checked() {
    assert_refused(
        "[[rule]]\nmode = \"enforced\"\n",
        2,
        &["`mode`", "enforce, fill, cap, exempt or audit"],
    );
    assert_refused(
        "[[rule]]\ndirection = \"out\"\n",
        2,
        &["`direction`", "\"outbound\"", "\"inbound\""],
    );
    assert_refused(
        "[[rule]]\nremote = \"10.0.0.1/8\"\n",
        2,
        &["`remote`", "did you mean 10.0.0.0/8"],
    );
    assert_refused(
        "[[rule]]\nremote = []\n",
        2,
        &["`remote`", "matches nothing"],
    );
    assert_refused(
        "[[rule]]\nremote = [\"10.0.0.0/8\", 7]\n",
        2,
        &["`remote`", "not a CIDR"],
    );
    assert_refused(
        "[[rule]]\nremote_port = 0\n",
        2,
        &["`remote_port`", "1..=65535"],
    );
    assert_refused(
        "[[rule]]\nlocal_port = \"90-80\"\n",
        2,
        &["`local_port`", "empty range"],
    );
    assert_refused(
        "[[rule]]\nlocal_port = 70000\n",
        2,
        &["`local_port`", "1..=65535"],
    );
    assert_refused("[[rule]]\ncgroup = \"/a/../b\"\n", 2, &["`cgroup`", "`..`"]);
    assert_refused("[agent]\ncgroups = []\n", 2, &["`cgroups`", "empty"]);
}

#[test]
fn type_errors_name_the_field_in_words_of_the_file() {
    assert_refused(
        "[default]\nlock = \"yes\"\n",
        2,
        &["field `lock`", "a boolean"],
    );
    assert_refused(
        "[agent]\nexisting = 1\n",
        2,
        &["field `existing`", "a boolean"],
    );
    assert_refused(
        "[default]\nidle = \"60s\"\nidle = \"1s\"\n",
        3,
        &["field `idle`", "duplicate"],
    );
    assert_refused(
        "default = \"enforce\"\n",
        1,
        &["field `default`", "expected a table"],
    );
    assert_refused(
        "[default]\ncount = 99999999999999999999999\n",
        2,
        &["field `count`", "too large"],
    );
    let error = refused("default = 1\n");
    assert!(!error.contains("Raw"), "internal type names leak: {error}");
}

#[test]
fn rule_names_are_unique() {
    assert_refused(
        "[[rule]]\nname = \"a\"\n\n[[rule]]\nname = \"a\"\n",
        4,
        &["\"a\"", "line 1"],
    );
}

#[test]
fn syntax_errors_point_at_the_line() {
    assert_refused("[default]\nidle = \"60s\nx = 1\n", 2, &[]);
}

#[test]
fn missing_unreadable_and_directory_paths_get_one_sentence() {
    let missing = load(Path::new("/nonexistent/policy.toml"))
        .err()
        .map(|e| e.to_string());
    assert!(
        missing
            .as_deref()
            .is_some_and(|e| e.contains("cannot read policy file /nonexistent/policy.toml")),
        "{missing:?}"
    );
    let dir = load(&std::env::temp_dir()).err().map(|e| e.to_string());
    assert!(
        dir.as_deref().is_some_and(|e| e.contains("is a directory")),
        "{dir:?}"
    );
}

/// Variants of the example a hand or a tool could produce: lines dropped, files cut short,
/// values swapped for wrong ones, keys misspelt, random bytes changed.
fn mutations() -> Vec<String> {
    const BAD_VALUES: [&str; 14] = [
        "\"\"",
        "\"0s\"",
        "-1",
        "1e400",
        "\"x\"",
        "[]",
        "{}",
        "true",
        "\"99999999999999999999s\"",
        "\"10.0.0.0/99\"",
        "\"65536\"",
        "\"é\"",
        "[\"/a\", 1]",
        "\"1-\"",
    ];
    let lines: Vec<&str> = EXAMPLE.lines().collect();
    let join = |lines: &[&str]| lines.join("\n");
    let mut out = Vec::new();
    for i in 0..lines.len() {
        let mut dropped = lines.clone();
        dropped.remove(i);
        out.push(join(&dropped));
        out.push(join(&lines[..i]));
        let cut = lines[i].len() / 2;
        if lines[i].is_char_boundary(cut) {
            out.push(format!("{}\n{}", join(&lines[..i]), &lines[i][..cut]));
        }
        if let Some((key, _)) = lines[i].split_once(" = ") {
            for value in BAD_VALUES {
                let mut changed = lines.clone();
                let line = format!("{key} = {value}");
                changed[i] = &line;
                out.push(join(&changed));
            }
            let mut renamed = lines.clone();
            let line = lines[i].replacen(key, &format!("{key}x"), 1);
            renamed[i] = &line;
            out.push(join(&renamed));
        }
    }
    // Deterministic byte noise (xorshift), kept valid UTF-8 the way a reader would see it.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..5000 {
        let mut bytes = EXAMPLE.as_bytes().to_vec();
        for _ in 0..=next() % 3 {
            let at = usize::try_from(next() % bytes.len() as u64).unwrap_or(0);
            const NOISE: &[u8] = b"=[]\"#\n .,-/:0123456789az{}\\\xff";
            bytes[at] = NOISE[usize::try_from(next() % NOISE.len() as u64).unwrap_or(0)];
        }
        out.push(String::from_utf8_lossy(&bytes).into_owned());
    }
    out
}

#[test]
fn thousands_of_broken_variants_are_refused_cleanly_never_a_panic() {
    let variants = mutations();
    assert!(variants.len() > 5000, "{} variants", variants.len());
    let mut refused = 0;
    for text in &variants {
        let outcome = std::panic::catch_unwind(|| {
            parse(Path::new("test.toml"), text).map(|policy| {
                let points = crate::plan::named_attach_points(&policy);
                // The compiler may refuse (limits), but must not panic either.
                let _tables = crate::compile::compile(&policy, &points, 1);
            })
        });
        match outcome {
            Err(_) => panic!("panicked on:\n{text}"),
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                refused += 1;
                let message = error.to_string();
                let place = message.split(':').take(3).collect::<Vec<_>>();
                assert!(
                    place.len() == 3
                        && place[0] == "test.toml"
                        && place[1].parse::<usize>().is_ok()
                        && place[2].parse::<usize>().is_ok(),
                    "an error without file:line:column: {message}\nfor:\n{text}"
                );
                assert!(!message.contains('\n'), "one line: {message}");
            }
        }
    }
    assert!(
        refused > 1000,
        "only {refused} of {} refused",
        variants.len()
    );
}
