//! Pre-assigned identity numbers ([`compile_with`]): stable across recompiles.
use std::path::Path;

use super::*;
use crate::load::parse_str;

fn workload(name: &str, ns: &str, ip: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{serviceAccount: {name}, labels: {{app: {name}}}, node: n1, addresses: [{ip}]}}\n"
    )
}

fn resources(names: &[(&str, &str)]) -> Vec<crate::load::Located> {
    let text: Vec<String> = names.iter().map(|(n, ip)| workload(n, "shop", ip)).collect();
    let resources = parse_str(Path::new("t.yaml"), &text.join("---\n")).expect("parses");
    crate::validate::validate(&resources).expect("valid");
    resources
}

/// Each workload's number, by name.
fn numbers(s: &Snapshot) -> BTreeMap<String, u32> {
    s.workloads.iter().map(|w| (w.name.clone(), w.identity)).collect()
}

/// What a store would keep: every number ever given (it only grows).
fn remember(kept: &mut Vec<(IdentityLabels, u32)>, s: &Snapshot) -> Identities {
    for ident in s.identities.values() {
        if !kept.iter().any(|(l, _)| *l == ident.labels) {
            kept.push((ident.labels.clone(), ident.id));
        }
    }
    Identities::new(kept.clone()).expect("consistent")
}

#[test]
fn adding_a_workload_renumbers_no_other_and_removing_one_frees_nothing() {
    let mut kept = Vec::new();
    let first = compile_for(&resources(&[("web", "10.0.0.2"), ("db", "10.0.0.3")]), DEFAULT_TRUST_DOMAIN);
    let map = remember(&mut kept, &first);
    // `api` sorts before both: without a map it would take 256 and push the others up.
    let second = compile_with(
        &resources(&[("web", "10.0.0.2"), ("db", "10.0.0.3"), ("api", "10.0.0.4")]),
        DEFAULT_TRUST_DOMAIN,
        &map,
    );
    let before = numbers(&first);
    let after = numbers(&second);
    assert_eq!(after["web"], before["web"]);
    assert_eq!(after["db"], before["db"]);
    assert_eq!(after["api"], 258, "a new identity is numbered above the map's largest");
    let unmapped = numbers(&compile(&resources(&[("web", "10.0.0.2"), ("db", "10.0.0.3"), ("api", "10.0.0.4")])));
    assert_ne!(unmapped["db"], before["db"], "the test must add a workload that would renumber without a map");

    // `db` goes away, `cache` comes: `db`'s number is not given to it.
    let map = remember(&mut kept, &second);
    let third = compile_with(
        &resources(&[("web", "10.0.0.2"), ("api", "10.0.0.4"), ("cache", "10.0.0.5")]),
        DEFAULT_TRUST_DOMAIN,
        &map,
    );
    let third_numbers = numbers(&third);
    assert_eq!(third_numbers["web"], before["web"]);
    assert_eq!(third_numbers["api"], 258);
    assert_eq!(third_numbers["cache"], 259, "the number of a removed identity stays taken");
    assert!(third.identity(before["db"]).is_none());
}

#[test]
fn the_maps_numbers_are_used_and_verdicts_follow_them() {
    let rs = resources(&[("web", "10.0.0.2"), ("db", "10.0.0.3")]);
    let label = |n: &str| IdentityLabels {
        namespace: "shop".into(),
        service_account: n.into(),
        labels: [("app".to_string(), n.to_string())].into(),
    };
    let map = Identities::new([(label("web"), 7000), (label("db"), 300)]).unwrap();
    let s = compile_with(&rs, DEFAULT_TRUST_DOMAIN, &map);
    assert_eq!(numbers(&s), BTreeMap::from([("web".into(), 7000), ("db".into(), 300)]));
    assert_eq!(s.identity_of("10.0.0.2".parse().unwrap()), 7000);
    assert_eq!(s.identity(300).map(|i| i.labels.service_account.as_str()), Some("db"));
    assert_eq!(s.identity_name(7000), "shop/web");
    let v = s.verdict("10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap(), 80);
    assert_eq!((v.src_identity, v.dst_identity), (7000, 300));
}

#[test]
fn a_map_that_gives_one_number_twice_or_out_of_range_is_refused() {
    let l = |sa: &str| IdentityLabels { namespace: "a".into(), service_account: sa.into(), labels: BTreeMap::new() };
    assert!(matches!(Identities::new([(l("x"), 300), (l("y"), 300)]), Err(IdentitiesError::Duplicate { id: 300, .. })));
    assert!(matches!(Identities::new([(l("x"), 2)]), Err(IdentitiesError::OutOfRange { id: 2, .. })));
    assert!(matches!(Identities::new([(l("x"), FIRST_CIDR_IDENTITY)]), Err(IdentitiesError::OutOfRange { .. })));
    let json = r#"[{"id":300,"namespace":"a","service_account":"x","labels":{}},
                   {"id":300,"namespace":"a","service_account":"y","labels":{}}]"#;
    let refused = serde_json::from_str::<Identities>(json).unwrap_err().to_string();
    assert!(refused.contains("300") && refused.contains("a/x"), "{refused}");
    // And a good one reads back as written.
    let good = Identities::new([(l("x"), 300), (l("y"), 999)]).unwrap();
    let text = serde_json::to_string(&good).unwrap();
    assert_eq!(serde_json::from_str::<Identities>(&text).unwrap(), good);
}
