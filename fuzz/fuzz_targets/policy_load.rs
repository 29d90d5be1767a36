//! Any bytes as a policy file: the YAML loader, the validator and, for what they accept, the
//! compiler and the verdict. None may panic, and a refusal must name the file.
#![no_main]

use std::net::IpAddr;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use palisade_model::{compile, load, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let resources = match load::parse_str(Path::new("fuzz.yaml"), text) {
        Ok(r) => r,
        Err(e) => {
            assert!(e.to_string().starts_with("fuzz.yaml"), "an error that does not name the file: {e}");
            return;
        }
    };
    if validate::validate(&resources).is_err() {
        return;
    }
    let snapshot = compile(&resources);
    // Every workload address against the others and one outsider.
    let outsider: IpAddr = "198.51.100.1".parse().unwrap();
    let addresses: Vec<IpAddr> = snapshot.addresses.keys().copied().take(8).chain(std::iter::once(outsider)).collect();
    for &src in &addresses {
        for &dst in &addresses {
            let kernel = snapshot.verdict(src, dst, 80);
            let exact = snapshot.authorize(src, None, dst, 80).verdict;
            assert!(
                !(kernel.action == palisade_model::Action::Deny && exact.action == palisade_model::Action::Allow),
                "the kernel cells deny {src} -> {dst}:80, which the exact evaluation allows"
            );
        }
    }
});
