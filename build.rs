//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so neither
//! this machine nor a Yocto/Buildroot build needs `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/konsul/edge/v1/sync.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    prost_build::Config::new()
        .btree_map(["."])
        .compile_fds(fds)?;
    Ok(())
}
