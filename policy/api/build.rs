//! Compiles the protobuf schema with `protox` (pure Rust) rather than `protoc`, so building
//! needs no system package and gives the same code on every machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/palisade.proto");
    let fds = protox::compile(["proto/palisade.proto"], ["proto"])?;
    // Ordered maps: the same labels give the same bytes (and the same digest) everywhere.
    tonic_prost_build::configure().btree_map(".").compile_fds(fds)?;
    Ok(())
}
