//! Consent rules, shared by the relay (which enforces them on every frame) and the host
//! agent (which enforces them before sending or obeying anything). Plain functions of
//! role, mode and grants: no I/O, no clocks.

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};

use crate::frame::Channel;
use crate::pb;
use crate::token::Role;

/// How far the operator may go in this session, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Mode {
    /// The operator sees and points; the customer does all typing.
    View = 1,
    /// The operator may operate the machine once the customer grants control.
    Control = 2,
}

impl Mode {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Mode::View),
            2 => Some(Mode::Control),
            _ => None,
        }
    }

    /// Permissions this mode can ever grant: everything but control in view mode.
    pub fn ceiling(self) -> Permissions {
        match self {
            Mode::View => Permissions::ALL.without(Permissions::CONTROL),
            Mode::Control => Permissions::ALL,
        }
    }

    /// What a session of this mode may ask for when the caller names nothing.
    pub fn default_permissions(self) -> Permissions {
        match self {
            Mode::View => Permissions::VIEW,
            Mode::Control => Permissions::VIEW | Permissions::CONTROL,
        }
    }

    pub fn from_pb(m: pb::SessionMode) -> Option<Self> {
        match m {
            pb::SessionMode::View => Some(Mode::View),
            pb::SessionMode::Control => Some(Mode::Control),
            pb::SessionMode::Unspecified => None,
        }
    }

    pub fn to_pb(self) -> pb::SessionMode {
        match self {
            Mode::View => pb::SessionMode::View,
            Mode::Control => pb::SessionMode::Control,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::View => "view",
            Mode::Control => "control",
        }
    }
}

/// A set of `pb::Permission` bits, plus the [`Permissions::PAUSED`] state flag a host's
/// grant may carry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u32);

impl Permissions {
    pub const NONE: Self = Self(0);
    pub const VIEW: Self = Self(pb::Permission::View as u32);
    pub const CONTROL: Self = Self(pb::Permission::Control as u32);
    pub const FILE_TRANSFER: Self = Self(pb::Permission::FileTransfer as u32);
    pub const SYSTEM_INFO: Self = Self(pb::Permission::SystemInfo as u32);
    pub const RECORDING: Self = Self(pb::Permission::Recording as u32);
    /// Every permission (not the [`Permissions::PAUSED`] flag).
    pub const ALL: Self = Self(0b1_1111);
    /// Not a permission: set in the host's grant while the customer has paused sharing,
    /// so the relay stops the screen at once (`pb::Permission::FlagPaused`). It rides in
    /// the grant because pausing must take effect at the relay exactly as fast as a
    /// revoke, through the same signal. Never part of a session's permissions.
    pub const PAUSED: Self = Self(pb::Permission::FlagPaused as u32);

    /// `None` if any unknown bit is set. Accepts the [`Permissions::PAUSED`] flag.
    pub fn from_bits(bits: u32) -> Option<Self> {
        (bits & !(Self::ALL.0 | Self::PAUSED.0) == 0).then_some(Self(bits))
    }

    /// The permissions only, without the [`Permissions::PAUSED`] flag.
    pub fn permissions(self) -> Self {
        self & Self::ALL
    }

    pub fn is_paused(self) -> bool {
        self.contains(Self::PAUSED)
    }

    /// Each single permission in this set, in bit order (one consent question each).
    pub fn singles(self) -> impl Iterator<Item = Self> {
        let bits = self.permissions().0;
        (0..5)
            .map(|i| Self(1 << i))
            .filter(move |p| bits & p.0 != 0)
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn names(self) -> Vec<&'static str> {
        [
            (Self::VIEW, "view"),
            (Self::CONTROL, "control"),
            (Self::FILE_TRANSFER, "file_transfer"),
            (Self::SYSTEM_INFO, "system_info"),
            (Self::RECORDING, "recording"),
            (Self::PAUSED, "paused"),
        ]
        .into_iter()
        .filter(|(p, _)| self.contains(*p))
        .map(|(_, n)| n)
        .collect()
    }
}

impl BitOr for Permissions {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitAnd for Permissions {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl Not for Permissions {
    type Output = Self;
    fn not(self) -> Self {
        Self(!self.0 & Self::ALL.0)
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permissions({})", self.names().join("|"))
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&self.names().join(","))
        }
    }
}

/// The grant a host may set: what it asked for, cut to the session's permissions and mode.
pub fn cap_grant(requested: Permissions, session: Permissions, mode: Mode) -> Permissions {
    requested & session & mode.ceiling()
}

/// Why a frame may not pass. Also the relay's metric label, so the set is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Denied {
    #[error("no screen before the customer grants view")]
    NoViewGrant,
    #[error("no input before the customer grants control")]
    NoControlGrant,
    #[error("input is never allowed in a view-only session")]
    ViewOnlySession,
    #[error("no file transfer before the customer grants it")]
    NoFileGrant,
    #[error("no system information before the customer grants it")]
    NoSystemInfoGrant,
    #[error("no screen while the customer has paused sharing")]
    Paused,
    #[error("a {role} may not send on the {channel} channel")]
    WrongSender {
        role: &'static str,
        channel: &'static str,
    },
    #[error("signal frames are for the relay and are never forwarded")]
    SignalNotForwarded,
}

impl Denied {
    pub fn label(self) -> &'static str {
        match self {
            Denied::NoViewGrant => "no_view_grant",
            Denied::NoControlGrant => "no_control_grant",
            Denied::ViewOnlySession => "view_only_session",
            Denied::NoFileGrant => "no_file_grant",
            Denied::NoSystemInfoGrant => "no_system_info_grant",
            Denied::Paused => "paused",
            Denied::WrongSender { .. } => "wrong_sender",
            Denied::SignalNotForwarded => "signal",
        }
    }
}

/// May a frame on `channel` from a `sender` be delivered, given the mode and grants now?
/// `granted` is the host's grant as the relay holds it, [`Permissions::PAUSED`] included:
/// while paused no screen frame passes; pointer, keyboard display (control channel),
/// chat and input are unaffected.
pub fn may_forward(
    channel: Channel,
    sender: Role,
    mode: Mode,
    granted: Permissions,
) -> Result<(), Denied> {
    let wrong = || Denied::WrongSender {
        role: sender.name(),
        channel: channel.name(),
    };
    let operator = matches!(sender, Role::Viewer);
    let talker = matches!(sender, Role::Host | Role::Viewer);
    match channel {
        Channel::Signal => Err(Denied::SignalNotForwarded),
        Channel::Screen if sender != Role::Host => Err(wrong()),
        Channel::Screen if !granted.contains(Permissions::VIEW) => Err(Denied::NoViewGrant),
        Channel::Screen if granted.is_paused() => Err(Denied::Paused),
        Channel::Screen => Ok(()),
        Channel::Input if !operator => Err(wrong()),
        Channel::Input if mode == Mode::View => Err(Denied::ViewOnlySession),
        Channel::Input if !granted.contains(Permissions::CONTROL) => Err(Denied::NoControlGrant),
        Channel::Input => Ok(()),
        Channel::Pointer if !operator => Err(wrong()),
        Channel::Pointer if !granted.contains(Permissions::VIEW) => Err(Denied::NoViewGrant),
        Channel::Pointer => Ok(()),
        Channel::Control | Channel::Chat | Channel::Ack if talker => Ok(()),
        Channel::Control | Channel::Chat | Channel::Ack => Err(wrong()),
        Channel::File if !talker => Err(wrong()),
        Channel::File if !granted.contains(Permissions::FILE_TRANSFER) => Err(Denied::NoFileGrant),
        Channel::File => Ok(()),
        Channel::SystemInfo if sender != Role::Host => Err(wrong()),
        Channel::SystemInfo if !granted.contains(Permissions::SYSTEM_INFO) => {
            Err(Denied::NoSystemInfoGrant)
        }
        Channel::SystemInfo => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_only_never_forwards_input_whatever_is_granted() {
        for bits in 0..=Permissions::ALL.bits() {
            let g = Permissions::from_bits(bits).expect("in range");
            assert!(may_forward(Channel::Input, Role::Viewer, Mode::View, g).is_err());
        }
    }

    #[test]
    fn grants_gate_each_channel() {
        let none = Permissions::NONE;
        let view = Permissions::VIEW;
        let ctl = Permissions::VIEW | Permissions::CONTROL;
        assert_eq!(
            may_forward(Channel::Screen, Role::Host, Mode::Control, none),
            Err(Denied::NoViewGrant)
        );
        assert!(may_forward(Channel::Screen, Role::Host, Mode::Control, view).is_ok());
        assert_eq!(
            may_forward(Channel::Input, Role::Viewer, Mode::Control, view),
            Err(Denied::NoControlGrant)
        );
        assert!(may_forward(Channel::Input, Role::Viewer, Mode::Control, ctl).is_ok());
        assert!(may_forward(Channel::Pointer, Role::Viewer, Mode::View, view).is_ok());
        assert!(may_forward(Channel::Chat, Role::Host, Mode::View, none).is_ok());
        assert!(may_forward(Channel::Screen, Role::Viewer, Mode::Control, ctl).is_err());
        assert!(may_forward(Channel::Input, Role::Host, Mode::Control, ctl).is_err());
        assert_eq!(
            may_forward(Channel::File, Role::Host, Mode::Control, ctl),
            Err(Denied::NoFileGrant)
        );
    }

    #[test]
    fn pause_stops_only_the_screen() {
        let g = Permissions::VIEW | Permissions::CONTROL | Permissions::PAUSED;
        assert_eq!(
            may_forward(Channel::Screen, Role::Host, Mode::Control, g),
            Err(Denied::Paused)
        );
        assert!(may_forward(Channel::Input, Role::Viewer, Mode::Control, g).is_ok());
        assert!(may_forward(Channel::Pointer, Role::Viewer, Mode::Control, g).is_ok());
        assert_eq!(Permissions::from_bits(g.bits()), Some(g));
        assert_eq!(g.permissions(), Permissions::VIEW | Permissions::CONTROL);
        assert!(!cap_grant(g, Permissions::ALL, Mode::Control).is_paused());
    }

    #[test]
    fn system_info_needs_its_own_grant_and_comes_from_the_host() {
        let view = Permissions::VIEW;
        assert_eq!(
            may_forward(Channel::SystemInfo, Role::Host, Mode::View, view),
            Err(Denied::NoSystemInfoGrant)
        );
        let g = view | Permissions::SYSTEM_INFO;
        assert!(may_forward(Channel::SystemInfo, Role::Host, Mode::View, g).is_ok());
        assert!(may_forward(Channel::SystemInfo, Role::Viewer, Mode::View, g).is_err());
    }

    #[test]
    fn singles_split_a_request() {
        let asked = Permissions::VIEW | Permissions::SYSTEM_INFO | Permissions::PAUSED;
        let v: Vec<_> = asked.singles().collect();
        assert_eq!(v, vec![Permissions::VIEW, Permissions::SYSTEM_INFO]);
    }

    #[test]
    fn grants_are_capped_by_mode_and_session() {
        let asked = Permissions::ALL;
        let session = Permissions::VIEW | Permissions::CONTROL;
        assert_eq!(cap_grant(asked, session, Mode::View), Permissions::VIEW);
        assert_eq!(cap_grant(asked, session, Mode::Control), session);
    }
}
