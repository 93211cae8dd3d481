//! Characters to X keysyms and back (the X11 protocol's keysym encoding, appendix A:
//! Latin-1 maps to itself, other Unicode to 0x0100_0000 + code point).

pub const BACKSPACE: u32 = 0xff08;
pub const TAB: u32 = 0xff09;
pub const RETURN: u32 = 0xff0d;
pub const ESCAPE: u32 = 0xff1b;
pub const SHIFT_L: u32 = 0xffe1;
pub const CONTROL_L: u32 = 0xffe3;
pub const ALT_L: u32 = 0xffe9;
pub const ISO_LEVEL3_SHIFT: u32 = 0xfe03;
pub const KANJI: u32 = 0xff21;
pub const MUHENKAN: u32 = 0xff22;
pub const HENKAN: u32 = 0xff23;
pub const HIRAGANA_KATAKANA: u32 = 0xff27;
pub const ZENKAKU_HANKAKU: u32 = 0xff2a;
pub const EISU_TOGGLE: u32 = 0xff30;
pub const CAPS_LOCK: u32 = 0xffe5;
pub const YEN: u32 = 0x00a5;

/// The keysym that types `c`.
pub fn from_char(c: char) -> u32 {
    match c {
        '\n' | '\r' => RETURN,
        '\t' => TAB,
        '\u{8}' => BACKSPACE,
        '\u{1b}' => ESCAPE,
        ' '..='~' | '\u{a0}'..='\u{ff}' => c as u32,
        _ => 0x0100_0000 + c as u32,
    }
}

/// The character a keysym types, if it types one.
pub fn to_char(keysym: u32) -> Option<char> {
    match keysym {
        RETURN => Some('\n'),
        TAB => Some('\t'),
        0x20..=0x7e | 0xa0..=0xff => char::from_u32(keysym),
        0x0100_0100..=0x0110_ffff => char::from_u32(keysym - 0x0100_0000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for c in ['a', 'Z', '@', '~', '¥', 'é', 'あ', 'ア', '漢', '\n', '\t'] {
            assert_eq!(to_char(from_char(c)), Some(c), "{c:?}");
        }
        assert_eq!(from_char('あ'), 0x0100_3042);
        assert_eq!(to_char(SHIFT_L), None);
    }
}
