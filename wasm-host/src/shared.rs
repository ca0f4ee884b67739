//! What plugins share across VMs: key-value data with compare-and-swap, and message queues.
//! Both are scoped by `vm_id` as in Envoy, so plugins configured with the same VM id (the
//! default, empty) see the same keys and can resolve each other's queues.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, Weak};

use crate::abi::Status;
use crate::plugin::Plugin;

/// Bounds that keep one plugin from exhausting the process through shared state.
const MAX_KEYS_PER_VM_ID: usize = 10_000;
const MAX_VALUE_BYTES: usize = 1024 * 1024;
const MAX_QUEUE_ITEMS: usize = 10_000;

/// One VM id's keys: value and CAS token.
type Scope = HashMap<String, (Vec<u8>, u32)>;

#[derive(Default)]
pub(crate) struct SharedData {
    scopes: Mutex<HashMap<String, Scope>>,
}

impl SharedData {
    /// The value and its CAS token, or `NotFound`.
    pub fn get(&self, vm_id: &str, key: &str) -> Result<(Vec<u8>, u32), Status> {
        let scopes = self.scopes.lock().expect("shared data lock");
        scopes
            .get(vm_id)
            .and_then(|scope| scope.get(key))
            .cloned()
            .ok_or(Status::NotFound)
    }

    /// Stores `value`; a non-zero `cas` must equal the current token or nothing changes
    /// (`CasMismatch`). Every write moves the token on.
    pub fn set(&self, vm_id: &str, key: &str, value: Vec<u8>, cas: u32) -> Result<(), Status> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(Status::BadArgument);
        }
        let mut scopes = self.scopes.lock().expect("shared data lock");
        let scope = scopes.entry(vm_id.to_owned()).or_default();
        match scope.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Err(Status::CasMismatch);
                }
                entry.0 = value;
                entry.1 = entry.1.wrapping_add(1).max(1);
            }
            None => {
                if scope.len() >= MAX_KEYS_PER_VM_ID {
                    return Err(Status::InternalFailure);
                }
                scope.insert(key.to_owned(), (value, 1));
            }
        }
        Ok(())
    }
}

/// Who is told when a queue has data: the root context of the VM that registered it.
#[derive(Clone)]
pub(crate) struct QueueOwner {
    pub plugin: Weak<Plugin>,
    pub slot: usize,
    pub generation: u64,
}

struct Queue {
    vm_id: String,
    name: String,
    owner: QueueOwner,
    items: VecDeque<Vec<u8>>,
}

#[derive(Default)]
pub(crate) struct SharedQueues {
    queues: Mutex<Vec<Queue>>,
}

impl SharedQueues {
    /// Registers (or re-registers, taking ownership) the queue `name`; ids start at 1.
    pub fn register(&self, vm_id: &str, name: &str, owner: QueueOwner) -> u32 {
        let mut queues = self.queues.lock().expect("queue lock");
        if let Some(index) = queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
        {
            queues[index].owner = owner;
            return index as u32 + 1;
        }
        queues.push(Queue {
            vm_id: vm_id.to_owned(),
            name: name.to_owned(),
            owner,
            items: VecDeque::new(),
        });
        queues.len() as u32
    }

    pub fn resolve(&self, vm_id: &str, name: &str) -> Result<u32, Status> {
        let queues = self.queues.lock().expect("queue lock");
        queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
            .map(|index| index as u32 + 1)
            .ok_or(Status::NotFound)
    }

    /// Appends an item and returns the owner to notify.
    pub fn enqueue(&self, id: u32, item: Vec<u8>) -> Result<QueueOwner, Status> {
        let mut queues = self.queues.lock().expect("queue lock");
        let queue = queues
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        if queue.items.len() >= MAX_QUEUE_ITEMS || item.len() > MAX_VALUE_BYTES {
            return Err(Status::InternalFailure);
        }
        queue.items.push_back(item);
        Ok(queue.owner.clone())
    }

    pub fn dequeue(&self, id: u32) -> Result<Vec<u8>, Status> {
        let mut queues = self.queues.lock().expect("queue lock");
        let queue = queues
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        queue.items.pop_front().ok_or(Status::Empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_guards_concurrent_writers() {
        let data = SharedData::default();
        assert_eq!(data.get("", "k"), Err(Status::NotFound));
        data.set("", "k", b"1".to_vec(), 0).unwrap();
        let (value, cas) = data.get("", "k").unwrap();
        assert_eq!(value, b"1");
        data.set("", "k", b"2".to_vec(), cas).unwrap();
        assert_eq!(
            data.set("", "k", b"3".to_vec(), cas),
            Err(Status::CasMismatch)
        );
        assert_eq!(data.get("", "k").unwrap().0, b"2");
        assert_eq!(data.get("other", "k"), Err(Status::NotFound));
    }
}
