//! The `countersign_vm_memory_bytes` gauge: the memory of the filter's wasm
//! VMs, which Envoy's admin `/memory` does not see (V8 keeps wasm memory
//! outside Envoy's heap). Held requests keep their state there, and a wasm
//! memory never shrinks, so it is how an operator sees what holding costs
//! inside the VMs.
//!
//! Every VM adds what its linear memory grew by and takes its share back
//! when it is shut down, so Envoy's sum over the VMs that define the gauge
//! is their total. A VM may serve several root contexts (plugins that share
//! a `vm_id` and code): the share ([`VmShare`]) is the VM's, counted once,
//! and leaves with the last of them.

use std::cell::Cell;
use std::rc::Rc;

use crate::host::Host;

/// The gauge's name (Envoy's `/stats`: `wasmcustom.` before it).
pub const VM_MEMORY_GAUGE: &str = "countersign_vm_memory_bytes";

#[derive(Clone, Copy, Default)]
struct Share {
    /// Bytes this VM has added to the gauge.
    counted: u64,
    /// Root contexts of this VM taking part.
    roots: u32,
}

/// One VM's share of the gauge, common to its root contexts (the adapter
/// keeps one per VM). Each root context that takes part holds a clone from
/// [`VmShare::join`] and gives it back with [`VmShare::leave`].
#[derive(Clone, Default)]
pub struct VmShare(Rc<Cell<Share>>);

impl VmShare {
    /// A root context of this VM takes part.
    pub fn join(&self) -> VmShare {
        let mut s = self.0.get();
        s.roots = s.roots.saturating_add(1);
        self.0.set(s);
        self.clone()
    }

    /// Adds what this VM's memory grew by since it was last counted (by any
    /// of its root contexts).
    pub fn count_growth(&self, host: &mut dyn Host) {
        let now = host.memory_bytes();
        let mut s = self.0.get();
        let grown = now.saturating_sub(s.counted);
        s.counted = s.counted.max(now);
        self.0.set(s);
        if grown > 0 {
            host.count(VM_MEMORY_GAUGE, i64::try_from(grown).unwrap_or(i64::MAX));
        }
    }

    /// A root context is done (its plugin removed or replaced, Envoy
    /// stopping); with the VM's last one, the VM's share leaves the gauge.
    pub fn leave(self, host: &mut dyn Host) {
        let mut s = self.0.get();
        s.roots = s.roots.saturating_sub(1);
        let counted = if s.roots == 0 {
            std::mem::take(&mut s.counted)
        } else {
            0
        };
        self.0.set(s);
        if counted > 0 {
            host.count(VM_MEMORY_GAUGE, -i64::try_from(counted).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::MockHost;
    use crate::worker::Worker;

    #[test]
    fn a_vms_memory_is_counted_once_on_its_roots_ticks_and_leaves_with_its_last_root() {
        // Two root contexts (two plugins sharing the VM), each with its
        // worker.
        let vm = VmShare::default();
        let (first, second) = (Worker::in_vm(&vm), Worker::in_vm(&vm));
        let mut host = MockHost::new(&first);
        host.vm_memory = 1 << 20;
        first.on_tick(&mut host);
        second.on_tick(&mut host);
        assert_eq!(host.metric(VM_MEMORY_GAUGE), 1 << 20);

        // Growth is added once, by whichever root ticks first; a tick
        // without growth makes no host call for it.
        host.vm_memory = 3 << 20;
        second.on_tick(&mut host);
        first.on_tick(&mut host);
        assert_eq!(host.metric(VM_MEMORY_GAUGE), 3 << 20);
        host.take_calls();
        first.on_tick(&mut host);
        assert!(!host.take_calls().contains(&"count"));

        // The VM's share stays while a root remains, and leaves, once, with
        // the last.
        first.on_done(&mut host);
        assert_eq!(host.metric(VM_MEMORY_GAUGE), 3 << 20);
        first.on_done(&mut host);
        assert_eq!(host.metric(VM_MEMORY_GAUGE), 3 << 20);
        second.on_done(&mut host);
        assert_eq!(host.metric(VM_MEMORY_GAUGE), 0);
        second.on_done(&mut host);
        assert_eq!(host.metric(VM_MEMORY_GAUGE), 0);
    }
}
