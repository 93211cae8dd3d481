//! System information the customer may share with the operator (`pb::SystemInfo`).
//!
//! Collected only when it is about to be sent: the view-only subset (OS, OS version,
//! browser, browser version) once VIEW is granted, the whole record once SYSTEM_INFO is.
//! Linux reads `/etc/os-release`, `/proc`, `/sys/class/dmi`, `statvfs`, `getifaddrs` and
//! the XDG `mimeapps.list` files; every field the platform cannot tell stays unset (the
//! proto's `optional`), so other platforms fill the same record. Nothing is written.
//! The parsers are plain functions, tested on fixed text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kakehashi_proto::pb;

/// Largest file read for system information; these files are a few KiB.
const MAX_FILE: u64 = 1024 * 1024;

/// The whole record this machine can tell.
pub fn collect() -> pb::SystemInfo {
    let mut info = summary();
    let read = |p: &str| read_small(Path::new(p));
    info.kernel = read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned());
    info.hostname = read("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned());
    info.manufacturer = read("/sys/class/dmi/id/sys_vendor").and_then(non_empty);
    info.model = read("/sys/class/dmi/id/product_name").and_then(non_empty);
    info.machine_type = read("/sys/class/dmi/id/chassis_type")
        .and_then(|s| s.trim().parse::<u32>().ok())
        .and_then(chassis_name)
        .map(str::to_owned);
    if let Some(cpu) = read("/proc/cpuinfo") {
        let c = parse_cpuinfo(&cpu);
        info.cpu_model = c.model;
        info.cpu_cores = c.cores;
        info.cpu_mhz = c.mhz;
    }
    if let Some(mem) = read("/proc/meminfo") {
        let m = parse_meminfo(&mem);
        info.memory_total_bytes = m.get("MemTotal").map(|kb| kb * 1024);
        info.memory_available_bytes = m.get("MemAvailable").map(|kb| kb * 1024);
    }
    if let Some((total, free)) = disk_space("/") {
        info.disk_total_bytes = Some(total);
        info.disk_free_bytes = Some(free);
    }
    info.default_mailer = default_handler("x-scheme-handler/mailto").map(desktop_name);
    info.interfaces = interfaces();
    // Firewall, antivirus and installed applications have no one answer on Linux (nft,
    // ufw, firewalld; no antivirus API; dpkg, rpm, flatpak, snap): left unset.
    info.apps_listed = false;
    info
}

/// The view-only subset: OS, OS version, default browser (its version is not
/// discoverable without running it, so it stays unset).
pub fn summary() -> pb::SystemInfo {
    let mut info = pb::SystemInfo::default();
    if let Some(text) = read_small(Path::new("/etc/os-release"))
        .or_else(|| read_small(Path::new("/usr/lib/os-release")))
    {
        let os = parse_os_release(&text);
        info.os_name = os
            .get("NAME")
            .cloned()
            .or_else(|| Some(std::env::consts::OS.to_owned()));
        info.os_version = os.get("VERSION").or_else(|| os.get("VERSION_ID")).cloned();
    } else {
        info.os_name = Some(std::env::consts::OS.to_owned());
    }
    info.default_browser = default_handler("x-scheme-handler/https")
        .or_else(|| default_handler("x-scheme-handler/http"))
        .map(desktop_name);
    info
}

/// Only the fields of the view-only subset of `info`.
pub fn view_subset(info: &pb::SystemInfo) -> pb::SystemInfo {
    pb::SystemInfo {
        os_name: info.os_name.clone(),
        os_version: info.os_version.clone(),
        default_browser: info.default_browser.clone(),
        browser_version: info.browser_version.clone(),
        ..Default::default()
    }
}

fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    file.take(MAX_FILE).read_to_string(&mut text).ok()?;
    Some(text)
}

fn non_empty(s: String) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// `KEY=value` and `KEY="quoted value"` lines.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.trim().to_owned(), v.replace("\\\"", "\""))
        })
        .collect()
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cpu {
    pub model: Option<String>,
    pub cores: Option<u32>,
    pub mhz: Option<u32>,
}

pub fn parse_cpuinfo(text: &str) -> Cpu {
    let mut cpu = Cpu::default();
    let mut processors = 0u32;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => processors += 1,
            "model name" | "Model" | "cpu model" if cpu.model.is_none() => {
                cpu.model = Some(v.to_owned());
            }
            "cpu MHz" if cpu.mhz.is_none() => {
                cpu.mhz = v.parse::<f64>().ok().map(|m| m.round() as u32);
            }
            _ => {}
        }
    }
    cpu.cores = (processors > 0).then_some(processors);
    cpu
}

/// `Name:   value kB` lines, values in kB.
pub fn parse_meminfo(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let n = v.split_whitespace().next()?.parse().ok()?;
            Some((k.trim().to_owned(), n))
        })
        .collect()
}

/// SMBIOS chassis types people recognise.
fn chassis_name(t: u32) -> Option<&'static str> {
    Some(match t {
        3 | 4 | 6 | 7 | 13 | 15 | 16 | 35 | 36 => "desktop",
        8..=10 | 14 | 31 | 32 => "laptop",
        11 => "handheld",
        17 | 23 | 28 | 29 => "server",
        30 => "tablet",
        1 => "virtual machine or other",
        _ => return None,
    })
}

/// `(total, free for unprivileged users)` bytes of the filesystem holding `path`.
fn disk_space(path: &str) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((
        (st.f_blocks as u64).saturating_mul(frsize),
        (st.f_bavail as u64).saturating_mul(frsize),
    ))
}

/// Interfaces with their MAC (from `/sys/class/net`) and addresses (`getifaddrs`).
fn interfaces() -> Vec<pb::NetworkInterface> {
    let mut by_name: BTreeMap<String, pb::NetworkInterface> = BTreeMap::new();
    for (name, addr) in if_addresses() {
        by_name
            .entry(name.clone())
            .or_insert_with(|| pb::NetworkInterface {
                name,
                ..Default::default()
            })
            .addresses
            .push(addr.to_string());
    }
    for (name, iface) in &mut by_name {
        iface.mac = read_small(&PathBuf::from(format!("/sys/class/net/{name}/address")))
            .and_then(non_empty)
            .filter(|m| m != "00:00:00:00:00:00");
    }
    by_name.into_values().collect()
}

fn if_addresses() -> Vec<(String, std::net::IpAddr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned and not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and its family says which sockaddr it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET means a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                std::net::IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6 means a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                std::net::IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        out.push((name, addr));
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The desktop file handling `mime` per the XDG mimeapps.list files, user first.
fn default_handler(mime: &str) -> Option<String> {
    let mut files = Vec::new();
    if let Some(config) = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
    {
        files.push(config.join("mimeapps.list"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        files.push(PathBuf::from(home).join(".local/share/applications/mimeapps.list"));
    }
    files.push(PathBuf::from("/etc/xdg/mimeapps.list"));
    files.push(PathBuf::from("/usr/share/applications/mimeapps.list"));
    files
        .iter()
        .filter_map(|f| read_small(f))
        .find_map(|text| parse_mimeapps(&text, mime))
}

/// The first handler of `mime` in a mimeapps.list's `[Default Applications]`.
pub fn parse_mimeapps(text: &str, mime: &str) -> Option<String> {
    let mut in_defaults = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_defaults = line == "[Default Applications]";
            continue;
        }
        if !in_defaults {
            continue;
        }
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == mime
        {
            return v
                .split(';')
                .map(str::trim)
                .find(|s| !s.is_empty())
                .map(str::to_owned);
        }
    }
    None
}

/// "firefox.desktop" -> "firefox".
fn desktop_name(desktop: String) -> String {
    desktop
        .strip_suffix(".desktop")
        .map(str::to_owned)
        .unwrap_or(desktop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release() {
        let m = parse_os_release(
            "NAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nID=debian\n",
        );
        assert_eq!(m["NAME"], "Debian GNU/Linux");
        assert_eq!(m["VERSION"], "12 (bookworm)");
        assert_eq!(m["ID"], "debian");
    }

    #[test]
    fn cpuinfo() {
        let c = parse_cpuinfo(
            "processor\t: 0\nmodel name\t: AMD EPYC 7B13\ncpu MHz\t\t: 2449.998\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n",
        );
        assert_eq!(c.model.as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(c.cores, Some(2));
        assert_eq!(c.mhz, Some(2450));
        assert_eq!(parse_cpuinfo(""), Cpu::default());
    }

    #[test]
    fn meminfo() {
        let m = parse_meminfo(
            "MemTotal:       8029428 kB\nMemAvailable:   5000000 kB\nHugePages_Total:       0\n",
        );
        assert_eq!(m["MemTotal"], 8_029_428);
        assert_eq!(m["MemAvailable"], 5_000_000);
    }

    #[test]
    fn mimeapps() {
        let text = "[Added Associations]\nx-scheme-handler/https=chromium.desktop;\n[Default Applications]\nx-scheme-handler/https=firefox.desktop;chromium.desktop\nx-scheme-handler/mailto=thunderbird.desktop\n";
        assert_eq!(
            parse_mimeapps(text, "x-scheme-handler/https").as_deref(),
            Some("firefox.desktop")
        );
        assert_eq!(
            parse_mimeapps(text, "x-scheme-handler/mailto")
                .map(desktop_name)
                .as_deref(),
            Some("thunderbird")
        );
        assert_eq!(parse_mimeapps(text, "text/plain"), None);
    }

    #[test]
    fn the_view_subset_has_only_its_four_fields() {
        let full = collect();
        let sub = view_subset(&full);
        assert_eq!(sub.os_name, full.os_name);
        assert!(sub.cpu_model.is_none() && sub.hostname.is_none() && sub.interfaces.is_empty());
        // On Linux the OS is always known.
        assert!(full.os_name.is_some());
    }
}
