//! The XDP program that steers VXLAN to the switch, and the `bpf(2)` calls that load and
//! attach it. No libbpf and no compiler: the program is 40-odd instructions, assembled here
//! from the kernel's instruction encoding (`linux/bpf.h`, `Documentation/bpf/standardized/`).
//!
//! It hands to the XSK of the receiving queue (an `XSKMAP` entry) exactly the frames the
//! kernel would deliver to the switch's UDP socket: Ethernet, IPv4 without options and not a
//! fragment, or IPv6 whose next header is UDP, addressed to the switch's underlay address and
//! VXLAN port. Everything else, and every frame of a queue without an XSK, passes to the
//! kernel untouched (`bpf_redirect_map` with `XDP_PASS` as its fallback).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `BPF_MAP_CREATE` and the other commands of `bpf(2)`.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_MAP_TYPE_XSKMAP`: queue index → AF_XDP socket.
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
/// `BPF_PROG_TYPE_XDP`.
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `BPF_XDP`: the attach type of an XDP link.
const BPF_XDP: u32 = 37;
/// `XDP_FLAGS_SKB_MODE` / `XDP_FLAGS_DRV_MODE` (linux/if_link.h).
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `XDP_PASS`, the program's answer for everything not ours.
const XDP_PASS: i32 = 2;
/// Helper `bpf_redirect_map`.
const HELPER_REDIRECT_MAP: i32 = 51;

/// Size of the `bpf_attr` union the calls below fill (larger than any of their members; the
/// kernel requires the unused tail to be zero, which it is).
const ATTR_SIZE: usize = 144;

/// One `bpf(2)` call with `attr` as its argument: its non-negative result.
fn bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised buffer of ATTR_SIZE bytes laid out as the
    // command's member of `union bpf_attr`; every pointer in it (instructions, license, log,
    // key, value) refers to memory that outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR_SIZE as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// A `bpf(2)` call that creates an object: its descriptor.
fn bpf_fd(cmd: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn put_u32(attr: &mut [u8; ATTR_SIZE], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; ATTR_SIZE], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// An `XSKMAP` of `entries` queue slots.
pub(super) fn create_xsk_map(entries: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, BPF_MAP_TYPE_XSKMAP);
    put_u32(&mut attr, 4, 4); // key: u32 queue index
    put_u32(&mut attr, 8, 4); // value: u32 socket descriptor
    put_u32(&mut attr, 12, entries);
    bpf_fd(BPF_MAP_CREATE, &mut attr)
}

/// Sets `map[queue] = xsk`.
pub(super) fn set_xsk(map: &OwnedFd, queue: u32, xsk: &impl AsRawFd) -> io::Result<()> {
    let key = queue;
    let value = xsk.as_raw_fd() as u32;
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u64(&mut attr, 8, (&raw const key) as u64);
    put_u64(&mut attr, 16, (&raw const value) as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    Ok(())
}

/// Loads the steering program for `local`:`port` with `map` as its `XSKMAP`. On a refusal the
/// error carries the verifier's log.
pub(super) fn load(local: IpAddr, port: u16, map: &OwnedFd, max_len: u16) -> io::Result<OwnedFd> {
    let insns = assemble(local, port, map.as_raw_fd(), max_len)
        .ok_or_else(|| io::Error::other("the XDP program did not assemble"))?;
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_XDP);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1); // log level
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    let name = b"vswitch_vxlan"; // at most 15 bytes and a NUL
    attr[48..48 + name.len()].copy_from_slice(name);
    bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let last: Vec<&str> = text.lines().rev().take(3).collect();
        io::Error::new(e.kind(), format!("{e}; verifier: {}", last.join(" / ")))
    })
}

/// How the program runs on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (native XDP): veth, and NICs whose driver supports it.
    Driver,
    /// In the generic receive path (any interface; an skb per frame, slower).
    Generic,
}

/// Attaches `prog` to interface `ifindex` through a BPF link (native mode first, generic if
/// the driver has none): the program stays attached while the link's descriptor is open and
/// goes with it, also when the process dies. Fails if another program holds the interface.
pub(super) fn attach(prog: &OwnedFd, ifindex: u32) -> io::Result<(OwnedFd, AttachMode)> {
    let link = |flags: u32| {
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
        put_u32(&mut attr, 4, ifindex);
        put_u32(&mut attr, 8, BPF_XDP);
        put_u32(&mut attr, 12, flags);
        bpf_fd(BPF_LINK_CREATE, &mut attr)
    };
    match link(XDP_FLAGS_DRV_MODE) {
        Ok(fd) => Ok((fd, AttachMode::Driver)),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(e),
        Err(_) => link(XDP_FLAGS_SKB_MODE).map(|fd| (fd, AttachMode::Generic)),
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

// Instruction classes, sizes, sources and operations (linux/bpf_common.h, linux/bpf.h).
const LDX: u8 = 0x01;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
const LD: u8 = 0x00;
const MEM: u8 = 0x60;
const IMM: u8 = 0x00;
const W: u8 = 0x00;
const H: u8 = 0x08;
const B: u8 = 0x10;
const DW: u8 = 0x18;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const AND: u8 = 0x50;
const MOV: u8 = 0xb0;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JNE: u8 = 0x50;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
/// `BPF_PSEUDO_MAP_FD`: the 64-bit immediate is a map descriptor.
const PSEUDO_MAP_FD: u8 = 1;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// A forward jump to a label, patched once the label's place is known.
#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    /// (instruction index, label)
    fixups: Vec<(usize, Label)>,
    labels: [Option<usize>; 4],
}

#[derive(Clone, Copy)]
enum Label {
    Pass = 0,
    V4 = 1,
    V6 = 2,
    Redirect = 3,
}

impl Asm {
    fn emit(&mut self, i: Insn) {
        self.code.push(i);
    }
    fn jump(&mut self, i: Insn, to: Label) {
        self.fixups.push((self.code.len(), to));
        self.code.push(i);
    }
    fn label(&mut self, l: Label) {
        self.labels[l as usize] = Some(self.code.len());
    }
    /// The program with its jumps resolved; None if a jump goes to a label never placed.
    fn finish(mut self) -> Option<Vec<Insn>> {
        for &(at, l) in &self.fixups {
            let target = self.labels[l as usize]?;
            self.code[at].off = i16::try_from(target as isize - at as isize - 1).ok()?;
        }
        Some(self.code)
    }
}

/// A network-order 16-bit field as a little-endian load sees it.
fn be16_as_loaded(v: u16) -> i32 {
    i32::from(u16::from_ne_bytes(v.to_be_bytes()))
}

/// Assembles the program for frames of at most `max_len` bytes (registers: r6 the context, r2 packet start, r3 packet end,
/// r5 the field under test, r0 a 32-bit constant for address words).
pub(super) fn assemble(local: IpAddr, port: u16, map_fd: i32, max_len: u16) -> Option<Vec<Insn>> {
    const ETH: i16 = 14;
    let mut a = Asm::default();
    a.emit(insn(ALU64 | MOV | X, 6, 1, 0, 0)); // r6 = ctx
    a.emit(insn(LDX | MEM | W, 2, 1, 0, 0)); // r2 = ctx->data
    a.emit(insn(LDX | MEM | W, 3, 1, 4, 0)); // r3 = ctx->data_end
    a.emit(insn(ALU64 | MOV | X, 4, 2, 0, 0)); // r4 = r2 + eth + ipv4 + udp
    a.emit(insn(ALU64 | ADD | K, 4, 0, 0, 14 + 20 + 8));
    a.jump(insn(JMP | JGT | X, 4, 3, 0, 0), Label::Pass);
    // Longer than an AF_XDP frame holds (a GRO'd packet in generic mode): the kernel's.
    a.emit(insn(ALU64 | MOV | X, 4, 2, 0, 0));
    a.emit(insn(ALU64 | ADD | K, 4, 0, 0, max_len as i32));
    a.jump(insn(JMP | JGT | X, 3, 4, 0, 0), Label::Pass);
    a.emit(insn(LDX | MEM | H, 5, 2, 12, 0)); // EtherType
    match local {
        IpAddr::V4(_) => a.jump(
            insn(JMP | JEQ | K, 5, 0, 0, be16_as_loaded(0x0800)),
            Label::V4,
        ),
        IpAddr::V6(_) => a.jump(
            insn(JMP | JEQ | K, 5, 0, 0, be16_as_loaded(0x86dd)),
            Label::V6,
        ),
    }
    a.jump(insn(JMP | JA, 0, 0, 0, 0), Label::Pass);
    // Address words compared as loaded (native order of network bytes), zero-extended.
    let words: Vec<i32> = match local {
        IpAddr::V4(ip) => vec![i32::from_ne_bytes(ip.octets())],
        IpAddr::V6(ip) => ip
            .octets()
            .chunks_exact(4)
            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let dport = be16_as_loaded(port);
    match local {
        IpAddr::V4(_) => {
            a.label(Label::V4);
            a.emit(insn(LDX | MEM | B, 5, 2, ETH, 0)); // version 4, header 20 bytes
            a.jump(insn(JMP | JNE | K, 5, 0, 0, 0x45), Label::Pass);
            a.emit(insn(LDX | MEM | B, 5, 2, ETH + 9, 0)); // protocol
            a.jump(insn(JMP | JNE | K, 5, 0, 0, 17), Label::Pass);
            a.emit(insn(LDX | MEM | H, 5, 2, ETH + 6, 0)); // MF and fragment offset
            a.emit(insn(ALU64 | AND | K, 5, 0, 0, be16_as_loaded(0x3fff)));
            a.jump(insn(JMP | JNE | K, 5, 0, 0, 0), Label::Pass);
            a.emit(insn(LDX | MEM | W, 5, 2, ETH + 16, 0)); // destination address
            a.emit(insn(ALU | MOV | K, 0, 0, 0, words[0]));
            a.jump(insn(JMP | JNE | X, 5, 0, 0, 0), Label::Pass);
            a.emit(insn(LDX | MEM | H, 5, 2, ETH + 20 + 2, 0)); // UDP destination port
            a.jump(insn(JMP | JNE | K, 5, 0, 0, dport), Label::Pass);
            a.jump(insn(JMP | JA, 0, 0, 0, 0), Label::Redirect);
        }
        IpAddr::V6(_) => {
            a.label(Label::V6);
            a.emit(insn(ALU64 | MOV | X, 4, 2, 0, 0)); // r4 = r2 + eth + ipv6 + udp
            a.emit(insn(ALU64 | ADD | K, 4, 0, 0, 14 + 40 + 8));
            a.jump(insn(JMP | JGT | X, 4, 3, 0, 0), Label::Pass);
            a.emit(insn(LDX | MEM | B, 5, 2, ETH + 6, 0)); // next header
            a.jump(insn(JMP | JNE | K, 5, 0, 0, 17), Label::Pass);
            for (i, w) in words.iter().enumerate() {
                a.emit(insn(LDX | MEM | W, 5, 2, ETH + 24 + 4 * i as i16, 0));
                a.emit(insn(ALU | MOV | K, 0, 0, 0, *w));
                a.jump(insn(JMP | JNE | X, 5, 0, 0, 0), Label::Pass);
            }
            a.emit(insn(LDX | MEM | H, 5, 2, ETH + 40 + 2, 0)); // UDP destination port
            a.jump(insn(JMP | JNE | K, 5, 0, 0, dport), Label::Pass);
            a.jump(insn(JMP | JA, 0, 0, 0, 0), Label::Redirect);
        }
    }
    a.label(Label::Redirect);
    // return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS)
    a.emit(insn(LDX | MEM | W, 2, 6, 16, 0));
    a.emit(insn(LD | IMM | DW, 1, PSEUDO_MAP_FD, 0, map_fd));
    a.emit(insn(0, 0, 0, 0, 0));
    a.emit(insn(ALU64 | MOV | K, 3, 0, 0, XDP_PASS));
    a.emit(insn(JMP | CALL, 0, 0, 0, HELPER_REDIRECT_MAP));
    a.emit(insn(JMP | EXIT, 0, 0, 0, 0));
    a.label(Label::Pass);
    a.emit(insn(ALU64 | MOV | K, 0, 0, 0, XDP_PASS));
    a.emit(insn(JMP | EXIT, 0, 0, 0, 0));
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        for local in ["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()] {
            let p = assemble(local, 4789, 3, 3840).expect("assembles");
            for (i, insn) in p.iter().enumerate() {
                if insn.code & 0x07 == JMP && insn.code & 0xf0 != CALL && insn.code & 0xf0 != EXIT {
                    let to = i as isize + 1 + insn.off as isize;
                    assert!(to > i as isize && (to as usize) < p.len(), "{i}: {insn:?}");
                }
            }
            assert_eq!(p.last().unwrap().code, JMP | EXIT);
        }
    }
}
