//! Generates the Snapshots service from `proto/` with protox (a protobuf compiler in Rust),
//! so that building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("containerd/services/snapshots/v1/snapshots.proto");
    let cri = root.join("k8s/cri/runtime/v1/api.proto");
    let descriptors = protox::compile([&file, &cri], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
