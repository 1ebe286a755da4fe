//! File modes through the real create paths, under a umask of 0 (so no mode
//! comes from the umask): the state dir, the SQLite database and its WAL
//! files and the JWT secret as `serve` opens them, and the VM directories
//! as the engine makes them. The files of a running VM (disk, logs,
//! sockets, pidfile, with the group of the VM's QEMU id) are checked by
//! `vmm_stub_engine`'s `vm_runs_in_its_cgroup_as_its_own_id_with_private_files`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use webhoster::vmm::{Engine, EngineOptions};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test]
async fn state_dir_database_secret_and_vm_dirs_are_private() {
    // SAFETY: umask only swaps an integer in the process's fs struct; this
    // binary has this one test.
    unsafe { libc::umask(0) };
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    use clap::Parser;
    let cli =
        webhoster::cli::Cli::try_parse_from(["webhoster", "serve", "--state-dir", state.to_str().unwrap()])
            .unwrap();
    let webhoster::cli::Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let (store, secret) = webhoster::app::open_state(&cli.paths, &args).await.unwrap();
    assert!(!secret.is_empty());
    // A write, so SQLite has its WAL files open.
    store.all_hostings().await.unwrap();
    assert_eq!(mode(&state), 0o711);
    assert_eq!(mode(&state.join("jwt.secret")), 0o600);
    let db = state.join("webhoster.db");
    assert_eq!(mode(&db), 0o600);
    for companion in ["webhoster.db-wal", "webhoster.db-shm"] {
        let path = state.join(companion);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{companion}");
        }
    }
    store.close().await;

    // An older install: wide modes are narrowed at the next start.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (store, _) = webhoster::app::open_state(&cli.paths, &args).await.unwrap();
    store.close().await;
    assert_eq!(mode(&state), 0o711);
    assert_eq!(mode(&db), 0o600);

    // The engine's dirs: `vms/` 0711 (each QEMU passes through to its own
    // dir), each VM's 0710 (its group is its QEMU's id, given at spawn).
    let engine = Engine::new(EngineOptions::new(cli.paths.vms_dir())).unwrap();
    assert_eq!(mode(&cli.paths.vms_dir()), 0o711);
    let dir = engine.vm_dir("vm-modes");
    dir.create().unwrap();
    assert_eq!(mode(dir.root()), 0o710);
}
