//! virtio-net ports for Python: `NetPort` (a TAP device, one end of a peer link, or a loopback)
//! and the native handlers that run a queue pair against it.

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::time::Duration;

use vvu_core::worker::net::switch::{Switch, SwitchMode};
use vvu_core::worker::net::{NetFeatures, NetPort, DEFAULT_PORT_BUFFER};

use crate::errors::to_pyerr;
use crate::worker::NativeHandler;

/// Where a virtio-net queue pair's frames go and come from. Clones share everything.
#[pyclass(name = "NetPort", module = "vvu._core", frozen)]
pub struct PyNetPort {
    port: NetPort,
}

/// The data-path features: the offloads from the acked `features` bits, the header layout
/// from the two flags.
fn features(mrg_rxbuf: bool, version_1: bool, acked: u64) -> NetFeatures {
    NetFeatures {
        mrg_rxbuf,
        version_1,
        ..NetFeatures::from_bits(acked)
    }
}

#[pymethods]
impl PyNetPort {
    /// Create (or attach to) the TAP interface `name` (`%d` lets the kernel number it) with
    /// virtio-net headers; with `multi_queue`, each call adds one queue of a multi-queue TAP.
    /// The interface is left down.
    #[staticmethod]
    #[pyo3(signature = (name, *, multi_queue = false))]
    fn tap(py: Python<'_>, name: &str, multi_queue: bool) -> PyResult<Self> {
        let port = py
            .detach(|| NetPort::tap(name, multi_queue))
            .map_err(to_pyerr)?;
        Ok(Self { port })
    }

    /// Two linked ports: what one transmits, the other receives. Each direction queues about
    /// `buffer_size` bytes (the kernel caps it at net.core.wmem_max) before it drops.
    #[staticmethod]
    #[pyo3(signature = (*, buffer_size = DEFAULT_PORT_BUFFER))]
    fn pair(buffer_size: usize) -> PyResult<(Self, Self)> {
        let (a, b) = NetPort::pair(buffer_size).map_err(to_pyerr)?;
        Ok((Self { port: a }, Self { port: b }))
    }

    /// Two ports linked through a kernel SOCK_SEQPACKET socketpair, one syscall per frame (the
    /// path peer links took before the in-process switch; a benchmark baseline).
    #[staticmethod]
    #[pyo3(signature = (*, buffer_size = DEFAULT_PORT_BUFFER))]
    fn socket_pair(buffer_size: usize) -> PyResult<(Self, Self)> {
        let (a, b) = NetPort::socket_pair(buffer_size).map_err(to_pyerr)?;
        Ok((Self { port: a }, Self { port: b }))
    }

    /// A port that hands every transmitted frame back to its own receive side.
    #[staticmethod]
    #[pyo3(signature = (*, buffer_size = DEFAULT_PORT_BUFFER))]
    fn loopback(buffer_size: usize) -> PyResult<Self> {
        let port = NetPort::loopback(buffer_size).map_err(to_pyerr)?;
        Ok(Self { port })
    }

    /// A frame source for benchmarks and tests: the receive queue is filled with IPv4/UDP
    /// frames of `sizes` bytes in turn (to `dst_mac` from `src_mac`, 198.18.0.1:9 to
    /// 198.18.0.2:9, the first 8 payload bytes a sequence number) as fast as buffers are
    /// posted; transmitted frames are counted and discarded.
    #[staticmethod]
    #[pyo3(signature = (sizes, *, dst_mac, src_mac))]
    fn generator(sizes: Vec<usize>, dst_mac: [u8; 6], src_mac: [u8; 6]) -> PyResult<Self> {
        let port = NetPort::generator(&sizes, dst_mac, src_mac).map_err(to_pyerr)?;
        Ok(Self { port })
    }

    /// The switch port id, for a port attached to a learning switch (None otherwise).
    #[getter]
    fn switch_port(&self) -> Option<usize> {
        self.port.switch().map(|(_, id)| id)
    }

    /// Seconds the port's queue workers busy-poll before sleeping (0: never). Applies to
    /// workers started afterwards.
    #[getter]
    fn get_busy_poll(&self) -> f64 {
        self.port.busy_poll().map_or(0.0, |d| d.as_secs_f64())
    }

    #[setter]
    fn set_busy_poll(&self, seconds: f64) -> PyResult<()> {
        if !(0.0..=1.0).contains(&seconds) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "busy_poll is 0..=1 second, not {seconds}"
            )));
        }
        let budget = Duration::from_secs_f64(seconds);
        self.port
            .set_busy_poll((!budget.is_zero()).then_some(budget));
        Ok(())
    }

    /// Longest frame the guest may transmit (longer ones are refused and counted in
    /// tx_errors): the advertised MTU plus 18 (Ethernet and VLAN header). Default 65535.
    #[getter]
    fn get_max_frame(&self) -> usize {
        self.port.max_frame()
    }

    #[setter]
    fn set_max_frame(&self, len: usize) {
        self.port.set_max_frame(len);
    }

    /// Whether the port takes UDP segmentation (USO) packets from the guest, i.e. whether
    /// VIRTIO_NET_F_HOST_USO may be offered: always, except on a TAP of a kernel older than 6.2.
    #[getter]
    fn takes_uso(&self) -> bool {
        self.port.takes_uso()
    }

    /// "tap", "peer", "loopback", "switch" or "generator".
    #[getter]
    fn kind(&self) -> &'static str {
        self.port.kind().as_str()
    }

    /// The TAP interface name as the kernel chose it; None for links.
    #[getter]
    fn name(&self) -> Option<String> {
        self.port.name().map(str::to_owned)
    }

    /// The handler for the receive queue of the pair (device → driver), for a QueueWorker.
    /// `features`: the acked feature bits, for the offloads (CSUM, GUEST_CSUM, HOST_TSO4/6,
    /// GUEST_TSO4/6, HOST_UFO, GUEST_UFO, HOST_USO, GUEST_USO4/6); 0: none.
    #[pyo3(signature = (*, mrg_rxbuf, version_1, features = 0))]
    fn rx_handler(&self, mrg_rxbuf: bool, version_1: bool, features: u64) -> NativeHandler {
        let handler = self
            .port
            .rx_handler(self::features(mrg_rxbuf, version_1, features));
        NativeHandler::from_handler(Box::new(handler), "net-rx")
    }

    /// The handler for the transmit queue of the pair (driver → device), for a QueueWorker.
    /// `features`: the acked feature bits, for the offloads (CSUM, GUEST_CSUM, HOST_TSO4/6,
    /// GUEST_TSO4/6, HOST_UFO, GUEST_UFO, HOST_USO, GUEST_USO4/6); 0: none.
    #[pyo3(signature = (*, mrg_rxbuf, version_1, features = 0))]
    fn tx_handler(&self, mrg_rxbuf: bool, version_1: bool, features: u64) -> NativeHandler {
        let handler = self
            .port
            .tx_handler(self::features(mrg_rxbuf, version_1, features));
        NativeHandler::from_handler(Box::new(handler), "net-tx")
    }

    /// Transmit an Ethernet frame (14..=65535 bytes) as if this port's guest had; False if the
    /// port's queue is full (the frame is dropped and counted).
    fn send(&self, py: Python<'_>, frame: PyBuffer<u8>) -> PyResult<bool> {
        let frame = frame.to_vec(py)?;
        self.port.send_frame(&frame).map_err(to_pyerr)
    }

    /// Take the next frame waiting for this port's guest, or None. Only while its receive queue
    /// is not running.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let frame = self.port.recv_frame().map_err(to_pyerr)?;
        Ok(frame.map(|f| PyBytes::new(py, &f)))
    }

    /// Discard every frame waiting for this port's guest; returns how many. Only while its
    /// receive queue is not running.
    fn drain(&self) -> PyResult<u64> {
        self.port.drain().map_err(to_pyerr)
    }

    /// Counters: tx_packets, tx_bytes, tx_dropped, tx_errors, rx_packets, rx_bytes, rx_dropped,
    /// rx_errors, rx_bad_chains, rx_starved, rx_overflow.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.port.stats();
        let dict = PyDict::new(py);
        for (key, value) in [
            ("tx_packets", s.tx_packets),
            ("tx_bytes", s.tx_bytes),
            ("tx_dropped", s.tx_dropped),
            ("tx_errors", s.tx_errors),
            ("rx_packets", s.rx_packets),
            ("rx_bytes", s.rx_bytes),
            ("rx_dropped", s.rx_dropped),
            ("rx_errors", s.rx_errors),
            ("rx_bad_chains", s.rx_bad_chains),
            ("rx_starved", s.rx_starved),
            ("rx_overflow", s.rx_overflow),
        ] {
            dict.set_item(key, value)?;
        }
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        match self.port.name() {
            Some(name) => format!("NetPort({}, {name})", self.kind()),
            None => format!("NetPort({})", self.kind()),
        }
    }
}

/// An in-process learning L2 switch that virtio-net ports attach to: frames move from one
/// front-end's transmit ring to another's receive ring in native code.
#[pyclass(name = "Switch", module = "vvu._core", frozen)]
pub struct PySwitch {
    switch: Switch,
}

#[pymethods]
impl PySwitch {
    #[new]
    fn new(name: &str) -> Self {
        Self {
            switch: Switch::new(name, SwitchMode::Learning),
        }
    }

    #[getter]
    fn name(&self) -> String {
        self.switch.name().to_owned()
    }

    /// Attach a port with `queue_pairs` queue pairs; returns one NetPort per queue pair (one
    /// switch port). Each receive queue holds up to `buffer_size` bytes of frames before frames
    /// for it are dropped (counted in its `rx_overflow`). Detached when all are gone.
    #[pyo3(signature = (*, queue_pairs = 1, buffer_size = DEFAULT_PORT_BUFFER))]
    fn attach(&self, queue_pairs: usize, buffer_size: usize) -> PyResult<Vec<PyNetPort>> {
        let ports = self
            .switch
            .attach(queue_pairs, buffer_size)
            .map_err(to_pyerr)?;
        Ok(ports.into_iter().map(|port| PyNetPort { port }).collect())
    }

    /// Ids of the attached ports.
    #[getter]
    fn ports(&self) -> Vec<usize> {
        self.switch.port_ids()
    }

    /// The learning table: MAC (6 bytes) to port id.
    fn mac_table<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (mac, port) in self.switch.mac_table() {
            dict.set_item(PyBytes::new(py, &mac), port)?;
        }
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!(
            "Switch({:?}, ports={:?})",
            self.switch.name(),
            self.switch.port_ids()
        )
    }
}
