//! Stop strings over a stream of text: text that might be the start of a stop string is held back
//! until it is known not to be, so a client never sees half of a stop string it asked to cut.

/// Watches released text for any of a set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet released because its tail could begin a stop string.
    held: String,
    stopped: bool,
}

/// What one [`StopStrings::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Text that is certainly part of the output.
    pub text: String,
    /// A stop string was found: `text` ends just before it and nothing more will be released.
    pub stopped: bool,
}

impl StopStrings {
    /// Empty strings are ignored (they would match everywhere; requests are validated upstream).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Self::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds newly decoded text; returns what may be shown now.
    pub fn push(&mut self, text: &str) -> Released {
        if self.stopped {
            return Released { text: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return Released { text: text.to_owned(), stopped: false };
        }
        self.held.push_str(text);
        // Earliest match wins; among matches at the same position the choice does not matter,
        // since everything from that position on is dropped.
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.stopped = true;
            let mut out = std::mem::take(&mut self.held);
            out.truncate(pos);
            return Released { text: out, stopped: true };
        }
        let keep_from = self.partial_match_start();
        let out = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        Released { text: out, stopped: false }
    }

    /// Releases whatever is held (the stream ended without a stop string completing).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Byte offset of the longest suffix of `held` that is a proper prefix of some stop string
    /// (`held.len()` if none).
    fn partial_match_start(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = self.held.len().saturating_sub(longest.saturating_sub(1));
        (earliest..self.held.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams `pieces` through a checker and returns (shown text, stopped).
    fn stream(stops: &[&str], pieces: &[&str]) -> (String, bool, Vec<String>) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()));
        let mut shown = String::new();
        let mut steps = Vec::new();
        for p in pieces {
            let r = s.push(p);
            shown.push_str(&r.text);
            steps.push(r.text.clone());
            if r.stopped {
                return (shown, true, steps);
            }
        }
        shown.push_str(&s.flush());
        (shown, false, steps)
    }

    #[test]
    fn stop_string_split_across_pieces_is_never_shown() {
        let (shown, stopped, steps) = stream(&["</end>"], &["hello <", "/e", "nd> more"]);
        assert!(stopped);
        assert_eq!(shown, "hello ");
        assert_eq!(steps, vec!["hello ", "", ""]);
    }

    #[test]
    fn held_prefix_is_released_once_it_diverges() {
        let (shown, stopped, steps) = stream(&["STOP"], &["a S", "T", "x b"]);
        assert!(!stopped);
        assert_eq!(shown, "a STx b");
        assert_eq!(steps, vec!["a ", "", "STx b"]);
    }

    #[test]
    fn earliest_of_several_stops_wins_and_flush_returns_tail() {
        let (shown, stopped, _) = stream(&["yy", "x"], &["abyyx"]);
        assert!(stopped);
        assert_eq!(shown, "ab");
        let (shown, stopped, _) = stream(&["abc"], &["xx", "ab"]);
        assert!(!stopped);
        assert_eq!(shown, "xxab");
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        let (shown, stopped, _) = stream(&["é!"], &["caf", "é", "é", "!"]);
        assert!(stopped);
        assert_eq!(shown, "café");
        let (shown, _, _) = stream(&["日本"], &["今日", "日は"]);
        assert_eq!(shown, "今日日は");
    }

    #[test]
    fn no_stops_passes_through() {
        let (shown, stopped, steps) = stream(&[""], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(shown, "ab");
        assert_eq!(steps, vec!["a", "b"]);
    }
}
