//! The console: COM1 (16550) through the `log` facade, optionally mirrored
//! to port 0xE9 (Bochs's debug port).

use core::fmt::Write;
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{BaudRate, Config, Uart16550};

struct Console {
    com1: Option<Uart16550<PioBackend>>,
    e9: bool,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console {
    com1: None,
    e9: false,
});

/// Initialises COM1 and installs the logger.
pub fn init(level: log::LevelFilter, e9: bool) {
    {
        let mut c = CONSOLE.lock();
        // SAFETY: 0x3F8-0x3FF are COM1's eight registers on every PC this
        // kernel boots on, and nothing else in the kernel touches them; the
        // port lives in the console for the rest of Tern's run.
        let port = unsafe { Uart16550::new_port(0x3F8) };
        // 115200 8N1, FIFOs on, no interrupts (Tern polls). A UART that does
        // not answer (no COM1) leaves the console on port 0xE9 only.
        let config = Config {
            baud_rate: BaudRate::Baud115200,
            ..Config::DEFAULT
        };
        c.com1 = port.ok().and_then(|mut p| p.init(config).ok().map(|()| p));
        c.e9 = e9;
    }
    // A second call finds the logger already set; that is harmless.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Takes the console away from whoever holds it: for the exception and
/// panic paths, which must print even if they interrupted a print.
pub fn break_lock() {
    if CONSOLE.is_locked() {
        // SAFETY: only called on the way to stopping Tern (exception report,
        // panic): the holder will never run again, so no two writers can
        // interleave in a way that matters.
        unsafe { CONSOLE.force_unlock() };
    }
}

/// Writes text to the console without the logger's prefix.
pub fn write_fmt(args: core::fmt::Arguments<'_>) {
    let mut c = CONSOLE.lock();
    let _ = c.write_fmt(args);
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.byte(b'\r');
            }
            self.byte(b);
        }
        Ok(())
    }
}

impl Console {
    fn byte(&mut self, b: u8) {
        if let Some(p) = self.com1.as_mut() {
            p.send_bytes_exact(&[b]);
        }
        if self.e9 {
            crate::cpu::debugcon_write(b);
        }
    }
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            write_fmt(format_args!("[{:5}] {}\n", r.level(), r.args()));
        }
    }
    fn flush(&self) {}
}

/// `print!` to the console.
#[macro_export]
macro_rules! print {
    ($($t:tt)*) => { $crate::serial::write_fmt(format_args!($($t)*)) };
}

/// `println!` to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($t:tt)*) => { $crate::serial::write_fmt(format_args!("{}\n", format_args!($($t)*))) };
}
