//! Incremental detokenisation: the text each new token adds.
//!
//! Byte-level BPE tokens can split a multi-byte UTF-8 character; decoding
//! token by token would then produce U+FFFD. We decode a sliding window and
//! only emit text once it no longer ends in an incomplete character.

use tokenizers::Tokenizer;

/// Turns a stream of token ids into text pieces.
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_start: usize,
    read_start: usize,
}

impl<'a> IncrementalDecoder<'a> {
    /// Starts an empty decoder.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_start: 0,
            read_start: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| e.to_string())
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let prefix = self.decode(&self.ids[self.prefix_start..self.read_start])?;
        let full = self.decode(&self.ids[self.prefix_start..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_start = self.read_start;
            self.read_start = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Returns whatever text is still held back (an incomplete character
    /// at the end of generation is emitted as U+FFFD).
    pub fn finish(&mut self) -> Result<String, String> {
        let prefix = self.decode(&self.ids[self.prefix_start..self.read_start])?;
        let full = self.decode(&self.ids[self.prefix_start..])?;
        self.prefix_start = self.ids.len();
        self.read_start = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(full[prefix.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }
}
