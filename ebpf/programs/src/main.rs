//! Palisade's kernel programs, loaded by ztunnel (one set per node).
//!
//! - `connect4` / `connect6` (cgroup/connect*, attached to each enrolled pod's cgroup): take
//!   the L4 verdict for an outgoing TCP connect — a denied connect fails with EPERM before a
//!   packet leaves — then rewrite the destination to ztunnel's outbound listener inside the
//!   pod and remember the original destination under the socket cookie.
//! - `sockops` (attached with them): when the kernel has chosen the source port, move the
//!   original destination to a key ztunnel can compute from an accepted socket
//!   (pod netns cookie, client port).
//! - `inbound` (sk_lookup, attached to each enrolled pod's netns): take the verdict for a TCP
//!   connection arriving from outside the pod, refuse it (RST) when denied, otherwise hand it
//!   to ztunnel's inbound listener in that pod.
//!
//! Verdicts read the policy generation in `CONFIG` once and then only that generation's
//! entries, so a reload (write new generation, flip `CONFIG`) never mixes two policies.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("palisade-ebpf only builds for bpfel-unknown-none; ztunnel's build script builds it");
}
