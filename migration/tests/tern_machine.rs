//! A Tern machine with the seed's device shapes writes its device state as
//! a QEMU-format stream that reads back, with every section walked by the
//! stream's own description to its last byte, and loads into a second
//! machine all or nothing.

use hv_core::machine::{CommitMode, DeviceSection, Machine, MachineConfig};
use hv_core::virtio::spec::{add_devices, DeviceSpec};
use migration::channel::MemChannel;
use migration::desc::walk_section;
use migration::reader::read_self_described;
use migration::writer::StreamWriter;

fn machine(shape: &str) -> Machine {
    let mut m = Machine::new_pc(&MachineConfig::default()).unwrap();
    m.add_platform(1_000_000_000, 0).unwrap();
    m.add_pci_host().unwrap();
    add_devices(&mut m, &DeviceSpec::parse(shape).unwrap(), 16, None).unwrap();
    m
}

fn stream(m: &Machine) -> Vec<u8> {
    let mut w = StreamWriter::new(MemChannel::new(), "pc").unwrap();
    w.ram_setup(0, &[("pc.ram", 32 << 20)]).unwrap();
    w.ram_begin(migration::writer::RamSection::End).unwrap();
    w.ram_finish().unwrap();
    for (i, (id, version, body, desc)) in m.save_devices_described().into_iter().enumerate() {
        let desc = desc.expect("every device with state in these shapes is described");
        w.device_raw(
            i as u32 + 1,
            &id.idstr,
            id.instance,
            version,
            &body,
            Some(desc.to_json()),
        )
        .unwrap();
    }
    w.finish(true).unwrap().into_bytes()
}

#[test]
fn seed_shapes_stream_and_walk_by_their_own_description() {
    for shape in ["net:8x16,blk:16x4", "net:8x1,blk:16x1", "net:1x16,blk:1x4"] {
        let m = machine(shape);
        let bytes = stream(&m);
        let parsed = read_self_described(&bytes).unwrap();
        let desc = migration::desc::VmDescription::from_json(parsed.description.as_ref().unwrap())
            .unwrap();
        let mut n = 0;
        for (info, body) in parsed.devices() {
            let d = desc.find(info.idstr, info.instance).unwrap();
            let (_, used) = walk_section(d, body).unwrap();
            assert_eq!(used, body.len(), "{shape}: {}", info.idstr);
            n += 1;
        }
        let (net, blk) = {
            let s = DeviceSpec::parse(shape).unwrap();
            (s.net.count, s.blk.count)
        };
        assert!(n > usize::from(net + blk), "{shape}: {n} sections");

        // The sections load into a machine of the same shape in one
        // transaction, and a machine of another shape refuses them.
        let sections: Vec<(hv_core::devices::DeviceId, u32, &[u8])> = parsed
            .devices()
            .map(|(i, b)| {
                (
                    hv_core::devices::DeviceId {
                        idstr: i.idstr.into(),
                        instance: i.instance,
                    },
                    i.version,
                    *b,
                )
            })
            .collect();
        let secs: Vec<DeviceSection> = sections
            .iter()
            .map(|(id, version, data)| DeviceSection {
                id,
                version: *version,
                data,
            })
            .collect();
        let mut same = machine(shape);
        let stats = same
            .load_devices(&secs, CommitMode::Deferred, true)
            .unwrap();
        assert_eq!(stats.forced_commits, 0);
        assert_eq!(same.save_devices(), m.save_devices());
        let mut other = machine("net:1x1");
        assert!(other
            .load_devices(&secs, CommitMode::Deferred, true)
            .is_err());
    }
}
