//! Compiles the protobuf schema with `protox` (pure Rust) rather than `protoc`, so building
//! needs no system package and gives the same code on every machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/palisade.proto");
    let fds = protox::compile(["proto/palisade.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
