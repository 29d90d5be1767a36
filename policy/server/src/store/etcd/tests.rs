use super::*;

#[test]
fn urls_name_the_members_and_refuse_what_is_not_supported() {
    assert_eq!(parse_url("etcd://127.0.0.1:2379").unwrap(), ["http://127.0.0.1:2379"]);
    assert_eq!(parse_url("etcd://a:1,b:2/").unwrap(), ["http://a:1", "http://b:2"]);
    assert_eq!(parse_url("http://a:1").unwrap(), ["http://a:1"]);
    for bad in ["etcd://", "https://a:1", "/var/lib/palisade", "etcd://user@a:1", "etcd://a:1/prefix"] {
        let e = parse_url(bad).expect_err(bad).to_string();
        assert!(e.starts_with(bad) && e.contains("etcd://host:port"), "{bad}: {e}");
    }
}

#[test]
fn resource_keys_stay_under_the_prefix() {
    let key = |kind: &str, ns: Option<&str>, name: &str| ResourceKey {
        kind: kind.into(),
        namespace: ns.map(Into::into),
        name: name.into(),
    };
    assert_eq!(
        resource_key(&key("Workload", Some("default"), "web")).unwrap(),
        "/palisade/resources/Workload/default/web"
    );
    assert_eq!(resource_key(&key("Namespace", None, "team-a")).unwrap(), "/palisade/resources/Namespace/team-a");
    // No name may reach another key, the marker, or outside the prefix.
    for bad in [key("Workload", Some("a/b"), "web"), key("Workload", Some("default"), ".revision"), key("", None, "x")]
    {
        let e = resource_key(&bad).expect_err("refused");
        assert!(e.contains("cannot be part of an etcd key"), "{e}");
    }
}

#[test]
fn a_value_must_hold_the_resource_its_key_names() {
    let text = "apiVersion: palisade.dev/v1alpha1\nkind: Namespace\nmetadata: {name: real}\n";
    let located = parse_value("/palisade/resources/Namespace/real", text).unwrap();
    assert_eq!(located.origin.to_string(), "etcd:/palisade/resources/Namespace/real:1");
    let e = parse_value("/palisade/resources/Namespace/other", text).unwrap_err();
    assert_eq!(
        e,
        "etcd:/palisade/resources/Namespace/other:1: holds Namespace real, which belongs at /palisade/resources/Namespace/real"
    );
    let two = format!("{text}---\n{text}");
    assert!(parse_value("/palisade/resources/Namespace/real", &two).unwrap_err().contains("holds 2 resources"));
}
