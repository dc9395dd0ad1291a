//! SentencePiece vocabularies embedded in GGUF files (`tokenizer.ggml.model =
//! llama`, as in Gemma and Llama 2), rebuilt as a `tokenizers` BPE model.
//!
//! The GGUF stores pieces, scores and piece types but no merge list.
//! SentencePiece's BPE repeatedly joins the adjacent pair whose concatenation
//! is the highest-scoring piece in the vocabulary; a BPE model whose merges
//! are every (left, right) split of every piece, ranked by the joined piece's
//! score, makes the same choices. This is also how the Hugging Face slow to
//! fast converters derive merges.

use candle_core::quantized::gguf_file::{self, Value};
use tokenizers::decoders::{
    byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecoderSequence, strip::Strip,
};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// SentencePiece's whitespace marker.
const SPACE: char = '▁';

/// Piece types as llama.cpp writes them to `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceType {
    Normal,
    Unknown,
    /// `<bos>`, `<start_of_turn>`, `<unused12>`…: markup, never part of a word.
    Control,
    /// Pieces that are always matched whole in raw text (Gemma: "\n",
    /// runs of spaces and tabs, HTML tags).
    UserDefined,
    Unused,
    /// `<0x00>`…`<0xFF>`, for characters outside the vocabulary.
    Byte,
}

impl PieceType {
    fn from_code(code: i64) -> Self {
        match code {
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            // 1 is normal; SentencePiece treats anything unrecognised the same.
            _ => PieceType::Normal,
        }
    }
}

/// A SentencePiece vocabulary and the options that shape encoding.
#[derive(Debug, Clone)]
pub(crate) struct Vocabulary {
    pub pieces: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<PieceType>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    /// Prefix the first word of raw text with "▁" (Llama 2 yes, Gemma no).
    pub add_space_prefix: bool,
    pub add_bos: bool,
    pub add_eos: bool,
}

impl Vocabulary {
    /// Reads `tokenizer.ggml.*` from a GGUF header.
    pub(crate) fn from_gguf(content: &gguf_file::Content) -> Result<Self, String> {
        let md = &content.metadata;
        let array = |key: &str| -> Result<&Vec<Value>, String> {
            md.get(key)
                .ok_or_else(|| format!("`{key}` is missing"))?
                .to_vec()
                .map_err(|_| format!("`{key}` is not an array"))
        };
        let pieces = array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| "`tokenizer.ggml.tokens` holds a non-string".to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let scores = array("tokenizer.ggml.scores")?
            .iter()
            .map(|v| {
                number(v)
                    .map(|x| x as f32)
                    .ok_or("`tokenizer.ggml.scores` holds a non-number")
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Files without piece types have only normal pieces.
        let types = match md.get("tokenizer.ggml.token_type") {
            None => vec![PieceType::Normal; pieces.len()],
            Some(_) => array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| {
                    number(v)
                        .map(|x| PieceType::from_code(x as i64))
                        .ok_or("`tokenizer.ggml.token_type` holds a non-number")
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let id = |key: &str| md.get(key).and_then(number).map(|x| x as u32);
        // Defaults are llama.cpp's for SentencePiece vocabularies.
        let flag = |key: &str, default: bool| {
            md.get(key)
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(default)
        };
        Ok(Self {
            pieces,
            scores,
            types,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            unk_id: id("tokenizer.ggml.unknown_token_id"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
            add_bos: flag("tokenizer.ggml.add_bos_token", true),
            add_eos: flag("tokenizer.ggml.add_eos_token", false),
        })
    }

    /// Builds the tokenizer: BPE with byte fallback, control pieces as
    /// special tokens, user-defined pieces as whole-match tokens.
    pub(crate) fn into_tokenizer(self) -> Result<Tokenizer, String> {
        let n = self.pieces.len();
        if self.scores.len() != n || self.types.len() != n {
            return Err(format!(
                "{n} pieces but {} scores and {} piece types",
                self.scores.len(),
                self.types.len()
            ));
        }
        let piece_of = |id: Option<u32>, what: &str| -> Result<Option<String>, String> {
            id.map(|id| {
                self.pieces
                    .get(id as usize)
                    .cloned()
                    .ok_or_else(|| format!("{what} id {id} is outside the {n}-piece vocabulary"))
            })
            .transpose()
        };
        let bos = piece_of(self.bos_id, "BOS")?;
        let eos = piece_of(self.eos_id, "EOS")?;
        let unk = piece_of(self.unk_id, "unknown-piece")?;

        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(n);
        for (id, piece) in self.pieces.iter().enumerate() {
            if vocab.insert(piece.clone(), id as u32).is_some() {
                // Ids are the model's row indices: a duplicate would leave one unreachable.
                return Err(format!("piece {piece:?} appears twice"));
            }
        }
        let merges = derive_merges(&self.pieces, &self.scores, &self.types, &vocab);
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let model = builder.build().map_err(|e| e.to_string())?;

        let mut tokenizer = Tokenizer::new(model);
        let to_space = Replace::new(" ", SPACE.to_string()).map_err(|e| e.to_string())?;
        tokenizer
            .with_normalizer(Some(to_space))
            .map_err(|e| e.to_string())?;
        let mut decoders = vec![
            Replace::new(SPACE.to_string(), " ")
                .map_err(|e| e.to_string())?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if self.add_space_prefix {
            // Only the start of the text gets the dummy prefix, not every
            // stretch between special tokens (llama.cpp does the same);
            // decoding drops it again.
            tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPACE, PrependScheme::First, false)));
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));

        // Control pieces are special: they encode whole from text such as a
        // chat template's "<start_of_turn>" and are hidden when decoding.
        // User-defined pieces (Gemma's "\n", "  ", "<table>") also encode
        // whole, but they are text, so decoding must keep them. Both are
        // matched in the raw text, before spaces become "▁".
        let added: Vec<AddedToken> = self
            .pieces
            .iter()
            .zip(&self.types)
            .filter_map(|(piece, kind)| match kind {
                PieceType::Control => Some(AddedToken::from(piece.as_str(), true)),
                PieceType::UserDefined => {
                    Some(AddedToken::from(piece.as_str(), false).normalized(false))
                }
                _ => None,
            })
            .collect();
        tokenizer.add_tokens(added).map_err(|e| e.to_string())?;

        let mut single = Vec::new();
        let mut special = Vec::new();
        if let (true, Some(bos), Some(id)) = (self.add_bos, &bos, self.bos_id) {
            single.push(bos.clone());
            special.push((bos.clone(), id));
        }
        single.push("$A".to_string());
        if let (true, Some(eos), Some(id)) = (self.add_eos, &eos, self.eos_id) {
            single.push(eos.clone());
            special.push((eos.clone(), id));
        }
        if !special.is_empty() {
            let pair = [
                single.clone(),
                single
                    .iter()
                    .map(|p| if p == "$A" { "$B".into() } else { p.clone() })
                    .collect(),
            ]
            .concat();
            let processor = TemplateProcessing::builder()
                .try_single(single)
                .and_then(|b| b.try_pair(pair))
                .map_err(|e| e.to_string())?
                .special_tokens(special)
                .build()
                .map_err(|e| e.to_string())?;
            tokenizer.with_post_processor(Some(processor));
        }
        Ok(tokenizer)
    }
}

/// Every split of a normal piece into two normal pieces is a merge; merges
/// that build higher-scoring pieces come first.
fn derive_merges(
    pieces: &[String],
    scores: &[f32],
    types: &[PieceType],
    vocab: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    let normal_id = |piece: &str| {
        vocab
            .get(piece)
            .copied()
            .filter(|&id| types.get(id as usize) == Some(&PieceType::Normal))
    };
    // (score of the joined piece, left id, right id, split position, joined id)
    let mut found: Vec<(f32, u32, u32, usize, u32)> = Vec::new();
    for (id, piece) in pieces.iter().enumerate() {
        if types[id] != PieceType::Normal {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let Some(l) = normal_id(left) {
                if let Some(r) = normal_id(right) {
                    found.push((scores[id], l, r, at, id as u32));
                }
            }
        }
    }
    // Ties (equal scores, or one piece with several splits) are broken by
    // the parts' ids so the order is deterministic.
    found.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    found
        .into_iter()
        .map(|(_, _, _, at, id)| {
            let (left, right) = pieces[id as usize].split_at(at);
            (left.to_string(), right.to_string())
        })
        .collect()
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => *x as f64,
        Value::I8(x) => *x as f64,
        Value::U16(x) => *x as f64,
        Value::I16(x) => *x as f64,
        Value::U32(x) => *x as f64,
        Value::I32(x) => *x as f64,
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A toy vocabulary: control pieces, a user-defined newline, byte
    /// pieces for "!" and "\n", and pieces whose scores force a particular
    /// merge order.
    fn toy(add_space_prefix: bool) -> Vocabulary {
        let mut entries: Vec<(&str, f32, PieceType)> = vec![
            ("<pad>", 0.0, PieceType::Control),
            ("<eos>", 0.0, PieceType::Control),
            ("<bos>", 0.0, PieceType::Control),
            ("<unk>", 0.0, PieceType::Unknown),
            ("<start_of_turn>", 0.0, PieceType::Control),
            ("\n", 0.0, PieceType::UserDefined),
            ("<0x21>", 0.0, PieceType::Byte),
            ("<0x0A>", 0.0, PieceType::Byte),
        ];
        entries.extend([
            ("▁", -10.0, PieceType::Normal),
            ("a", -11.0, PieceType::Normal),
            ("b", -12.0, PieceType::Normal),
            ("c", -13.0, PieceType::Normal),
            // "bc" outranks "ab", so "abc" is a + bc, not ab + c;
            // "▁a" outranks both.
            ("bc", -1.0, PieceType::Normal),
            ("ab", -2.0, PieceType::Normal),
            ("abc", -3.0, PieceType::Normal),
            ("▁a", -0.5, PieceType::Normal),
        ]);
        Vocabulary {
            pieces: entries.iter().map(|e| e.0.to_string()).collect(),
            scores: entries.iter().map(|e| e.1).collect(),
            types: entries.iter().map(|e| e.2).collect(),
            bos_id: Some(2),
            eos_id: Some(1),
            unk_id: Some(3),
            add_space_prefix,
            add_bos: true,
            add_eos: false,
        }
    }

    fn tokens(t: &Tokenizer, text: &str, special: bool) -> Vec<String> {
        t.encode(text, special).unwrap().get_tokens().to_vec()
    }

    #[test]
    fn merges_follow_the_joined_pieces_scores() {
        let t = toy(false).into_tokenizer().unwrap();
        // "bc" is joined first; "a"+"bc" is a split of "abc", so it follows.
        assert_eq!(tokens(&t, "abc", false), ["abc"]);
        assert_eq!(tokens(&t, "ab", false), ["ab"]);
        // After a space, "ab" is "▁a" + "b": "▁a" is joined first.
        assert_eq!(tokens(&t, "c ab", false), ["c", "▁a", "b"]);
    }

    #[test]
    fn control_pieces_are_special_and_user_defined_pieces_are_kept_text() {
        let t = toy(false).into_tokenizer().unwrap();
        let enc = t.encode("<start_of_turn>a\nb", false).unwrap();
        assert_eq!(enc.get_tokens(), ["<start_of_turn>", "a", "\n", "b"]);
        assert_eq!(enc.get_ids(), [4, 9, 5, 10]);
        // Decoding hides control pieces but not the newline.
        assert_eq!(t.decode(enc.get_ids(), true).unwrap(), "a\nb");
        assert_eq!(
            t.decode(enc.get_ids(), false).unwrap(),
            "<start_of_turn>a\nb"
        );
    }

    #[test]
    fn characters_outside_the_vocabulary_fall_back_to_bytes() {
        let t = toy(false).into_tokenizer().unwrap();
        let enc = t.encode("a!", false).unwrap();
        assert_eq!(enc.get_tokens(), ["a", "<0x21>"]);
        assert_eq!(t.decode(enc.get_ids(), true).unwrap(), "a!");
        // Neither a byte piece nor "?" exists: the unknown piece.
        assert_eq!(tokens(&t, "?", false), ["<unk>"]);
    }

    #[test]
    fn bos_is_added_to_raw_text_only_when_asked() {
        let t = toy(false).into_tokenizer().unwrap();
        assert_eq!(tokens(&t, "a", true), ["<bos>", "a"]);
        assert_eq!(tokens(&t, "a", false), ["a"]);
    }

    #[test]
    fn space_prefix_is_added_once_and_removed_when_decoding() {
        let without = toy(false).into_tokenizer().unwrap();
        assert_eq!(tokens(&without, "a", false), ["a"]);
        let with = toy(true).into_tokenizer().unwrap();
        assert_eq!(tokens(&with, "a", false), ["▁a"]);
        // Not again after a special token.
        assert_eq!(
            tokens(&with, "a<start_of_turn>a", false),
            ["▁a", "<start_of_turn>", "a"]
        );
        let ids = with.encode("a c", false).unwrap().get_ids().to_vec();
        assert_eq!(with.decode(&ids, true).unwrap(), "a c");
    }

    #[test]
    fn inconsistent_vocabularies_are_rejected() {
        let mut v = toy(false);
        v.scores.pop();
        assert!(v.into_tokenizer().unwrap_err().contains("scores"));
        let mut v = toy(false);
        v.pieces[9] = "b".into();
        assert!(v.into_tokenizer().unwrap_err().contains("twice"));
        let mut v = toy(false);
        v.bos_id = Some(99);
        assert!(v.into_tokenizer().unwrap_err().contains("BOS"));
    }
}
