//! Golden argv tests: for each fixture spec, the QEMU command line, one
//! argument per line, must equal `tests/golden/<name>.args`. A missing
//! expected file is written for review and the test fails, so it is never
//! silently accepted. Needs no QEMU.

use std::path::{Path, PathBuf};

use webhoster::vmm::{AccelChoice, Plan, Snapshot, VmNet, VmSpec, argv_for, snapshot_argv_for};

fn spec(vm_id: &str, plan: &str, net: VmNet) -> VmSpec {
    VmSpec {
        vm_id: vm_id.into(),
        plan: Plan::load(plan).unwrap(),
        kernel: "/var/cache/webhoster/images/abc/vmlinuz".into(),
        initrd: "/var/cache/webhoster/images/abc/initrd.img".into(),
        base_disk: "/var/cache/webhoster/images/abc/base.qcow2".into(),
        append: "console=ttyS0 root=/dev/vda rw quiet".into(),
        seed_iso: format!("/var/lib/webhoster/vms/{vm_id}/seed.iso").into(),
        net,
        labels: Default::default(),
        restore: None,
    }
}

fn check(name: &str, accel: AccelChoice, spec: &VmSpec) {
    let argv = argv_for(accel, Path::new("/var/lib/webhoster/vms"), spec);
    compare(name, argv);
}

fn compare(name: &str, argv: Vec<String>) {
    let actual = argv.join("\n") + "\n";
    let file: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "golden",
        &format!("{name}.args"),
    ]
    .iter()
    .collect();
    match std::fs::read_to_string(&file) {
        Ok(expected) => assert_eq!(
            actual,
            expected,
            "argv for {name} differs from {}; if the change is intended, delete the file, \
             rerun, review and commit",
            file.display()
        ),
        Err(_) => {
            std::fs::write(&file, &actual).unwrap();
            panic!("wrote {} for review; rerun to compare", file.display());
        }
    }
}

#[test]
fn standard_plan_with_tap_under_tcg() {
    let spec = spec(
        "vm-0f3a9c",
        "standard",
        VmNet::Tap {
            tap_name: "whvm0f3a9c".into(),
            mac: "52:54:00:0f:3a:9c".into(),
        },
    );
    check("vmm_standard_tap_tcg", AccelChoice::Tcg, &spec);
}

#[test]
fn small_plan_with_user_net_under_kvm() {
    let spec = spec(
        "vm-small1",
        "small",
        VmNet::User {
            hostfwd: vec![
                ("127.0.0.1:10022".parse().unwrap(), 22),
                ("127.0.0.1:10080".parse().unwrap(), 80),
            ],
        },
    );
    check("vmm_small_user_kvm", AccelChoice::Kvm, &spec);
}

#[test]
fn no_network_and_a_comma_in_a_path() {
    let mut spec = spec("vm-nonet", "small", VmNet::None);
    spec.seed_iso = "/srv/odd,dir/seed.iso".into();
    check("vmm_nonet_comma", AccelChoice::Tcg, &spec);
}

/// A clone: the cold line plus the pinned machine, the RAM memfd mapped
/// privately, vmgenid, `-incoming defer -S`.
#[test]
fn clone_of_a_small_template_with_tap_under_tcg() {
    let mut spec = spec(
        "vm-c10e01",
        "small",
        VmNet::Tap {
            tap_name: "whvmc10e01".into(),
            mac: "52:54:00:c1:0e:01".into(),
        },
    );
    spec.base_disk = "/var/lib/webhoster/templates/0123abcd/disk.qcow2".into();
    let argv = snapshot_argv_for(
        AccelChoice::Tcg,
        Path::new("/var/lib/webhoster/vms"),
        &spec,
        Snapshot::Clone,
    );
    compare("vmm_clone_small_tap_tcg", argv);
}

/// The template: the same line with `share=on`, user networking without
/// forwards, and no `-incoming`.
#[test]
fn small_template_under_tcg() {
    let spec = spec("tpl-0123abcd4567", "small", VmNet::User { hostfwd: vec![] });
    let argv = snapshot_argv_for(
        AccelChoice::Tcg,
        Path::new("/var/lib/webhoster/templates/0123abcd"),
        &spec,
        Snapshot::Template,
    );
    compare("vmm_template_small_tcg", argv);
}

/// A clone differs from its template only in the per-VM parts: name, paths,
/// the netdev backend (and the NIC's MAC), the RAM's sharing, `-incoming`.
#[test]
fn a_clone_line_is_the_template_line_but_for_per_vm_parts() {
    let tpl = spec("tpl-0123abcd4567", "small", VmNet::User { hostfwd: vec![] });
    let clone = spec(
        "vm-c10e01",
        "small",
        VmNet::User {
            hostfwd: vec![("127.0.0.1:2222".parse().unwrap(), 22)],
        },
    );
    let t = snapshot_argv_for(AccelChoice::Tcg, Path::new("/t"), &tpl, Snapshot::Template);
    let c = snapshot_argv_for(AccelChoice::Tcg, Path::new("/v"), &clone, Snapshot::Clone);
    assert_eq!(&c[c.len() - 3..], ["-incoming", "defer", "-S"]);
    let c = &c[..c.len() - 3];
    assert_eq!(t.len(), c.len());
    let differs: Vec<(&String, &String)> = t.iter().zip(c).filter(|(a, b)| a != b).collect();
    for (a, b) in &differs {
        let per_vm = a.contains("tpl-0123abcd4567") || a.starts_with("user,") || a.contains("share=on");
        assert!(per_vm, "{a:?} vs {b:?} is not a per-VM part");
    }
}
