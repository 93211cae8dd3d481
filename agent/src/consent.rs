//! How the customer's answers become grants. Plain functions, no I/O except the
//! terminal prompt at the bottom, so the rules are tested on their own.

use std::io::{BufRead, Write};

use kakehashi_proto::policy::cap_grant;
use kakehashi_proto::{Mode, Permissions};

/// How the host obtains the customer's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    /// Ask yes/no on the terminal, showing the SAS and what is asked.
    Prompt,
    /// Scripted: grant what is requested within this set, deny the rest.
    Approve(Permissions),
    /// Emit `HostEvent::ConsentRequested` and wait for `Host::answer`.
    Manual,
}

/// One question for the customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentRequest {
    /// The viewer asking.
    pub viewer: u64,
    /// What is asked, already cut to what the session could ever grant.
    pub permissions: Permissions,
    pub note: String,
    /// The SAS of the viewer asking, for the customer to compare with the operator's.
    pub sas: String,
    /// The question is whether this supervisor may watch too (`permissions` is VIEW;
    /// answering with VIEW admits it), not a change to the session's grants.
    pub supervisor: bool,
}

/// What one answer does to the grant set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The full granted set after the answer.
    pub granted: Permissions,
    /// What was asked and refused.
    pub denied: Permissions,
}

/// The part of a request the session could ever grant; the rest is refused unasked.
pub fn askable(asked: Permissions, session: Permissions, mode: Mode) -> Permissions {
    cap_grant(asked, session, mode)
}

/// Applies an answer: only asked permissions can be granted by it, grants accumulate,
/// and the total is capped by the session's permissions and mode.
pub fn decide(
    current: Permissions,
    asked: Permissions,
    answer: Permissions,
    session: Permissions,
    mode: Mode,
) -> Decision {
    let approved = answer & asked;
    Decision {
        granted: cap_grant(current | approved, session, mode),
        denied: asked.without(approved),
    }
}

/// The scripted answer of [`Consent::Approve`].
pub fn scripted_answer(allowed: Permissions, asked: Permissions) -> Permissions {
    asked & allowed
}

/// The question as the customer reads it.
pub fn prompt_text(req: &ConsentRequest) -> String {
    let mut text = if req.supervisor {
        format!(
            "A supervisor (check the code {}) asks to watch your screen too",
            req.sas
        )
    } else {
        format!(
            "The operator (check the code {}) asks for: {}",
            req.sas, req.permissions
        )
    };
    if !req.note.is_empty() {
        text.push_str(&format!(" (\"{}\")", req.note));
    }
    text.push_str(". Allow? [y/n] ");
    text
}

/// `Some(true)` for yes, `Some(false)` for no, `None` to ask again.
pub fn parse_yes_no(line: &str) -> Option<bool> {
    match line.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "はい" => Some(true),
        "n" | "no" | "いいえ" => Some(false),
        _ => None,
    }
}

/// Asks on the terminal, blocking. End of input counts as "no": nothing is granted
/// without an explicit yes.
pub fn prompt_blocking(req: &ConsentRequest) -> Permissions {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        // A failed flush only loses the question's echo, not the decision.
        let _ = write!(out, "{}", prompt_text(req));
        let _ = out.flush();
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => return Permissions::NONE,
            Ok(_) => match parse_yes_no(&line) {
                Some(true) => return req.permissions,
                Some(false) => return Permissions::NONE,
                None => {
                    let _ = writeln!(out, "Please answer y or n.");
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIEW: Permissions = Permissions::VIEW;
    const CONTROL: Permissions = Permissions::CONTROL;

    #[test]
    fn grants_accumulate_and_are_capped() {
        let session = VIEW | CONTROL;
        let d = decide(Permissions::NONE, VIEW, VIEW, session, Mode::Control);
        assert_eq!(d.granted, VIEW);
        assert_eq!(d.denied, Permissions::NONE);
        let d = decide(d.granted, CONTROL, CONTROL, session, Mode::Control);
        assert_eq!(d.granted, VIEW | CONTROL);
        // Control can never be granted in a view-only session, whatever the answer.
        let d = decide(VIEW, CONTROL, CONTROL, session, Mode::View);
        assert_eq!(d.granted, VIEW);
    }

    #[test]
    fn an_answer_cannot_grant_what_was_not_asked() {
        let d = decide(
            Permissions::NONE,
            VIEW,
            Permissions::ALL,
            Permissions::ALL,
            Mode::Control,
        );
        assert_eq!(d.granted, VIEW);
    }

    #[test]
    fn refusals_are_reported_and_keep_earlier_grants() {
        let d = decide(
            VIEW,
            CONTROL,
            Permissions::NONE,
            VIEW | CONTROL,
            Mode::Control,
        );
        assert_eq!(d.granted, VIEW);
        assert_eq!(d.denied, CONTROL);
    }

    #[test]
    fn scripted_approval_grants_within_its_set() {
        assert_eq!(scripted_answer(VIEW, VIEW | CONTROL), VIEW);
        assert_eq!(scripted_answer(Permissions::NONE, VIEW), Permissions::NONE);
        assert_eq!(scripted_answer(Permissions::ALL, CONTROL), CONTROL);
    }

    #[test]
    fn askable_drops_what_the_session_cannot_grant() {
        assert_eq!(askable(VIEW | CONTROL, VIEW | CONTROL, Mode::View), VIEW);
        assert_eq!(
            askable(Permissions::FILE_TRANSFER, VIEW, Mode::Control),
            Permissions::NONE
        );
    }

    #[test]
    fn yes_no_parsing() {
        assert_eq!(parse_yes_no(" Y\n"), Some(true));
        assert_eq!(parse_yes_no("yes"), Some(true));
        assert_eq!(parse_yes_no("n"), Some(false));
        assert_eq!(parse_yes_no("NO"), Some(false));
        assert_eq!(parse_yes_no(""), None);
        assert_eq!(parse_yes_no("maybe"), None);
    }

    #[test]
    fn prompt_shows_sas_and_request() {
        let text = prompt_text(&ConsentRequest {
            viewer: 2,
            permissions: VIEW | CONTROL,
            note: "to fix the printer".into(),
            sas: "123 456".into(),
            supervisor: false,
        });
        assert!(text.contains("123 456"));
        assert!(text.contains("view,control"));
        assert!(text.contains("printer"));
    }
}
