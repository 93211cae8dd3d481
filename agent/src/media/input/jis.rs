//! The Japanese 106/109-key (JIS) layout on Linux evdev keycodes, as xkeyboard-config's
//! `jp(106)` defines it: which physical key produces which keysym, unshifted and
//! shifted. Text is typed by keysym against the customer's live keymap, so a JIS
//! customer gets JIS positions without this table; the table is for the two places
//! where positions matter: translating a JIS operator's raw key positions into keysyms,
//! and loading the layout into a display that lacks it (tests, Xvfb demos).

use super::keysym::*;

/// One key: X keycode (xkeyboard-config's evdev numbering), unshifted and shifted keysym.
pub type KeyDef = (u8, u32, u32);

/// The keys whose meaning differs from the US layout, plus the letters and digits so the
/// table is a complete typing layout on its own.
pub const JIS106: &[KeyDef] = &[
    (49, ZENKAKU_HANKAKU, KANJI),
    (10, '1' as u32, '!' as u32),
    (11, '2' as u32, '"' as u32),
    (12, '3' as u32, '#' as u32),
    (13, '4' as u32, '$' as u32),
    (14, '5' as u32, '%' as u32),
    (15, '6' as u32, '&' as u32),
    (16, '7' as u32, '\'' as u32),
    (17, '8' as u32, '(' as u32),
    (18, '9' as u32, ')' as u32),
    (19, '0' as u32, '~' as u32),
    (20, '-' as u32, '=' as u32),
    (21, '^' as u32, '~' as u32),
    // The yen key: xkeyboard-config maps it to backslash (Japanese fonts draw 0x5c as ¥).
    (132, '\\' as u32, '|' as u32),
    (24, 'q' as u32, 'Q' as u32),
    (25, 'w' as u32, 'W' as u32),
    (26, 'e' as u32, 'E' as u32),
    (27, 'r' as u32, 'R' as u32),
    (28, 't' as u32, 'T' as u32),
    (29, 'y' as u32, 'Y' as u32),
    (30, 'u' as u32, 'U' as u32),
    (31, 'i' as u32, 'I' as u32),
    (32, 'o' as u32, 'O' as u32),
    (33, 'p' as u32, 'P' as u32),
    (34, '@' as u32, '`' as u32),
    (35, '[' as u32, '{' as u32),
    (66, EISU_TOGGLE, CAPS_LOCK),
    (38, 'a' as u32, 'A' as u32),
    (39, 's' as u32, 'S' as u32),
    (40, 'd' as u32, 'D' as u32),
    (41, 'f' as u32, 'F' as u32),
    (42, 'g' as u32, 'G' as u32),
    (43, 'h' as u32, 'H' as u32),
    (44, 'j' as u32, 'J' as u32),
    (45, 'k' as u32, 'K' as u32),
    (46, 'l' as u32, 'L' as u32),
    (47, ';' as u32, '+' as u32),
    (48, ':' as u32, '*' as u32),
    (51, ']' as u32, '}' as u32),
    (52, 'z' as u32, 'Z' as u32),
    (53, 'x' as u32, 'X' as u32),
    (54, 'c' as u32, 'C' as u32),
    (55, 'v' as u32, 'V' as u32),
    (56, 'b' as u32, 'B' as u32),
    (57, 'n' as u32, 'N' as u32),
    (58, 'm' as u32, 'M' as u32),
    (59, ',' as u32, '<' as u32),
    (60, '.' as u32, '>' as u32),
    (61, '/' as u32, '?' as u32),
    (97, '\\' as u32, '_' as u32),
    (100, HENKAN, HENKAN),
    (101, HIRAGANA_KATAKANA, HIRAGANA_KATAKANA),
    (102, MUHENKAN, MUHENKAN),
];

/// The keysym a JIS keyboard's key `keycode` (X numbering) produces.
pub fn keysym(keycode: u8, shift: bool) -> Option<u32> {
    JIS106
        .iter()
        .find(|(kc, ..)| *kc == keycode)
        .map(|&(_, plain, shifted)| if shift { shifted } else { plain })
}

/// Where `c` sits on a JIS keyboard: (X keycode, needs shift). The first key wins
/// where two produce it (backslash: the yen key).
pub fn position(c: char) -> Option<(u8, bool)> {
    let ks = from_char(c);
    JIS106.iter().find_map(|&(kc, plain, shifted)| {
        if plain == ks {
            Some((kc, false))
        } else if shifted == ks {
            Some((kc, true))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jis_positions_differ_from_us_where_they_should() {
        // '@' is unshifted left of '[' ('P'+1) on JIS, shift+2 on US.
        assert_eq!(position('@'), Some((34, false)));
        assert_eq!(position('"'), Some((11, true)));
        assert_eq!(position(':'), Some((48, false)));
        assert_eq!(position('*'), Some((48, true)));
        assert_eq!(position('_'), Some((97, true)));
        assert_eq!(position('('), Some((17, true)));
        assert_eq!(keysym(21, false), Some('^' as u32));
        assert_eq!(keysym(100, false), Some(HENKAN));
        assert_eq!(keysym(200, false), None);
    }

    #[test]
    fn every_printable_ascii_character_has_a_position() {
        for c in ' '..='~' {
            if c == ' ' {
                continue; // the space bar is the same key everywhere and not listed
            }
            assert!(position(c).is_some(), "{c:?}");
        }
    }

    #[test]
    fn keycodes_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for (kc, ..) in JIS106 {
            assert!(seen.insert(kc), "keycode {kc} twice");
        }
    }
}
