//! Labeled evaluation items: a generic JSONL format and readers for the public development
//! sets in `../shared/data` (capitals, ARC-Easy, GSM8K, MMLU, NQ-open, WebQuestions, MAWPS; see
//! its `SOURCES.md`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::grading::{last_number, normalize, Grader};
use super::EvalError;

/// One question to ask the local model, with how to grade its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// Stable id within the dataset (line number or the source's own id).
    pub id: String,
    /// The user message sent to the model.
    pub prompt: String,
    /// How the answer is graded.
    pub grader: Grader,
    /// Generation limit for this item.
    pub max_tokens: usize,
    /// Generation stops before the first of these (none for the built-in sets; a few-shot
    /// completion prompt for a base model needs `"\n"`, or the model goes on to write the
    /// next question and its answer, which grading by containment would read).
    pub stop: Vec<String>,
}

/// Where the items come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dataset {
    /// `capitals/capitals-dev.jsonl`: "What is the capital of X?".
    Capitals,
    /// `arc/ARC-Easy-dev.jsonl`: grade-school science, multiple choice.
    Arc,
    /// `gsm8k/test.jsonl`: arithmetic word problems.
    Gsm8k,
    /// `mmlu/test/*.csv`: 57 subjects, multiple choice.
    Mmlu,
    /// `nq_open/NQ-open.efficientqa.dev.1.1.jsonl`: open factoid questions (EfficientQA dev).
    NqOpen,
    /// `webquestions/val.json`: open factoid questions from search queries.
    WebQuestions,
    /// `mawps/{AddSub,SingleEq}.json`: one-step arithmetic word problems.
    Mawps,
    /// A labeled JSONL file in the generic format (see [`read_jsonl`]).
    File(PathBuf),
}

impl std::str::FromStr for Dataset {
    type Err = EvalError;

    fn from_str(s: &str) -> Result<Self, EvalError> {
        Ok(match s {
            "capitals" => Self::Capitals,
            "arc" => Self::Arc,
            "gsm8k" => Self::Gsm8k,
            "mmlu" => Self::Mmlu,
            "nq_open" => Self::NqOpen,
            "webquestions" => Self::WebQuestions,
            "mawps" => Self::Mawps,
            path if path.ends_with(".jsonl") || Path::new(path).is_file() => {
                Self::File(PathBuf::from(path))
            }
            other => return Err(EvalError::UnknownDataset(other.to_owned())),
        })
    }
}

impl Dataset {
    /// The name written into records and reports.
    pub fn name(&self) -> String {
        match self {
            Self::Capitals => "capitals".to_owned(),
            Self::Arc => "arc".to_owned(),
            Self::Gsm8k => "gsm8k".to_owned(),
            Self::Mmlu => "mmlu".to_owned(),
            Self::NqOpen => "nq_open".to_owned(),
            Self::WebQuestions => "webquestions".to_owned(),
            Self::Mawps => "mawps".to_owned(),
            Self::File(path) => path
                .file_stem()
                .map_or_else(|| "custom".to_owned(), |s| s.to_string_lossy().into_owned()),
        }
    }

    /// Reads every item, in the source's order.
    pub fn load(&self, data_dir: &Path) -> Result<Vec<Item>, EvalError> {
        match self {
            Self::Capitals => read_capitals(&data_dir.join("capitals/capitals-dev.jsonl")),
            Self::Arc => read_arc(&data_dir.join("arc/ARC-Easy-dev.jsonl")),
            Self::Gsm8k => read_gsm8k(&data_dir.join("gsm8k/test.jsonl")),
            Self::Mmlu => read_mmlu(&data_dir.join("mmlu/test")),
            Self::NqOpen => {
                read_nq_open(&data_dir.join("nq_open/NQ-open.efficientqa.dev.1.1.jsonl"))
            }
            Self::WebQuestions => read_webquestions(&data_dir.join("webquestions/val.json")),
            Self::Mawps => {
                let mut items = read_mawps(&data_dir.join("mawps/AddSub.json"), "addsub")?;
                items.extend(read_mawps(
                    &data_dir.join("mawps/SingleEq.json"),
                    "singleeq",
                )?);
                Ok(items)
            }
            Self::File(path) => read_jsonl(path),
        }
    }
}

/// Generation limits: short answers need few tokens; arithmetic needs room to reason.
const SHORT_ANSWER_TOKENS: usize = 24;
const CHOICE_TOKENS: usize = 8;
const ARITHMETIC_TOKENS: usize = 256;
/// One-step problems need one line of working, not a multi-step derivation: 128 tokens hold
/// it with room to spare and halve the worst-case generation time against 256.
const ONE_STEP_TOKENS: usize = 128;

/// The instruction after an open factoid question: without it SmolLM2 writes a paragraph,
/// and a long answer contains the gold string by luck more often than a short one.
const FACTOID_INSTRUCTION: &str = "Answer with a short phrase only.";

/// Spelling variants and official alternatives the model may use; the data lists one form.
const CAPITAL_ALIASES: &[(&str, &[&str])] = &[
    ("Kyiv", &["Kiev"]),
    ("Ulan Bator", &["Ulaanbaatar"]),
    ("Naypyidaw", &["Nay Pyi Taw", "Naypyitaw"]),
    ("City of San Marino", &["San Marino"]),
    ("Hagåtña", &["Agana"]),
    ("South Tarawa", &["Tarawa"]),
    ("Bern", &["Berne"]),
    ("Astana", &["Nur-Sultan"]),
    ("Sucre", &["La Paz"]),
    ("Lobamba", &["Mbabane"]),
    ("Luxembourg", &["Luxembourg City"]),
    ("Kuwait City", &["Kuwait"]),
];

fn read_lines(path: &Path) -> Result<Vec<(usize, String)>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_owned()))
        .collect())
}

fn parse_line<T: for<'de> Deserialize<'de>>(
    path: &Path,
    line: usize,
    text: &str,
) -> Result<T, EvalError> {
    serde_json::from_str(text).map_err(|source| EvalError::Parse {
        path: path.to_owned(),
        line,
        message: source.to_string(),
    })
}

#[derive(Deserialize)]
struct CapitalRow {
    country: String,
    capital: Vec<String>,
}

/// Capitals: the prompt asks for the city name only, which SmolLM2 needs to stay on topic.
fn read_capitals(path: &Path) -> Result<Vec<Item>, EvalError> {
    read_lines(path)?
        .into_iter()
        .map(|(line, text)| {
            let row: CapitalRow = parse_line(path, line, &text)?;
            let mut answers = row.capital.clone();
            for (capital, aliases) in CAPITAL_ALIASES {
                if row.capital.iter().any(|c| c == capital) {
                    answers.extend(aliases.iter().map(|a| (*a).to_owned()));
                }
            }
            // Where the capital is named like the country (Monaco, Kuwait), the echoed
            // question must not count as the answer; where the country's name contains the
            // capital's ("São Tomé and Príncipe"), naming the country must not either.
            let mut ignore = vec![format!("capital of {}", row.country)];
            let country = normalize(&row.country);
            if answers
                .iter()
                .map(|a| normalize(a))
                .any(|a| a != country && country.contains(&a))
            {
                ignore.push(row.country.clone());
            }
            Ok(Item {
                id: format!("capitals/{line}"),
                prompt: format!(
                    "What is the capital of {}? Answer with the city name only.",
                    row.country
                ),
                grader: Grader::Contains { answers, ignore },
                max_tokens: SHORT_ANSWER_TOKENS,
                stop: Vec::new(),
            })
        })
        .collect()
}

/// A multiple-choice question as the model sees it: the stem, one line per choice, and an
/// instruction to answer with the label only (a weak model otherwise rambles).
pub fn choice_prompt(question: &str, labels: &[String], texts: &[String]) -> String {
    let mut prompt = question.trim().to_owned();
    prompt.push('\n');
    for (label, text) in labels.iter().zip(texts) {
        prompt.push_str(&format!("{label}. {}\n", text.trim()));
    }
    prompt.push_str("Answer with the letter of the correct choice only.");
    prompt
}

fn choice_item(
    id: String,
    question: &str,
    labels: Vec<String>,
    texts: Vec<String>,
    answer: String,
) -> Item {
    Item {
        id,
        prompt: choice_prompt(question, &labels, &texts),
        grader: Grader::Choice {
            answer,
            labels,
            texts,
        },
        max_tokens: CHOICE_TOKENS,
        stop: Vec::new(),
    }
}

#[derive(Deserialize)]
struct ArcRow {
    id: String,
    question: ArcQuestion,
    #[serde(rename = "answerKey")]
    answer_key: String,
}

#[derive(Deserialize)]
struct ArcQuestion {
    stem: String,
    choices: Vec<ArcChoice>,
}

#[derive(Deserialize)]
struct ArcChoice {
    text: String,
    label: String,
}

/// ARC: labels are kept as the source has them (mostly A-D, a few 1-4).
fn read_arc(path: &Path) -> Result<Vec<Item>, EvalError> {
    read_lines(path)?
        .into_iter()
        .map(|(line, text)| {
            let row: ArcRow = parse_line(path, line, &text)?;
            let (labels, texts) = row
                .question
                .choices
                .into_iter()
                .map(|c| (c.label, c.text))
                .unzip();
            Ok(choice_item(
                format!("arc/{}", row.id),
                &row.question.stem,
                labels,
                texts,
                row.answer_key,
            ))
        })
        .collect()
}

#[derive(Deserialize)]
struct Gsm8kRow {
    question: String,
    answer: String,
}

/// GSM8K: gold is the number after `####`; the model is asked to end with the number.
fn read_gsm8k(path: &Path) -> Result<Vec<Item>, EvalError> {
    read_lines(path)?
        .into_iter()
        .map(|(line, text)| {
            let row: Gsm8kRow = parse_line(path, line, &text)?;
            let gold = row
                .answer
                .rsplit("####")
                .next()
                .and_then(last_number)
                .ok_or_else(|| EvalError::Parse {
                    path: path.to_owned(),
                    line,
                    message: "no number after ####".to_owned(),
                })?;
            Ok(Item {
                id: format!("gsm8k/{line}"),
                prompt: format!(
                    "{}\nSolve the problem step by step, then write the final answer as a number.",
                    row.question.trim()
                ),
                grader: Grader::Numeric { answer: gold },
                max_tokens: ARITHMETIC_TOKENS,
                stop: Vec::new(),
            })
        })
        .collect()
}

/// MMLU: `question,A,B,C,D,answer` CSV rows, one file per subject, in file name order.
fn read_mmlu(dir: &Path) -> Result<Vec<Item>, EvalError> {
    let io = |source| EvalError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    let mut items = Vec::new();
    for file in files {
        let subject = file
            .file_stem()
            .map(|s| s.to_string_lossy().trim_end_matches("_test").to_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&file).map_err(|source| EvalError::Io {
            path: file.clone(),
            source,
        })?;
        for (row_index, row) in parse_csv(&text).into_iter().enumerate() {
            let [question, a, b, c, d, answer] =
                <[String; 6]>::try_from(row).map_err(|row| EvalError::Parse {
                    path: file.clone(),
                    line: row_index + 1,
                    message: format!("expected 6 columns, got {}", row.len()),
                })?;
            let labels = ["A", "B", "C", "D"].map(str::to_owned).to_vec();
            items.push(choice_item(
                format!("mmlu/{subject}/{}", row_index + 1),
                &question,
                labels,
                vec![a, b, c, d],
                answer.trim().to_owned(),
            ));
        }
    }
    Ok(items)
}

/// RFC 4180 CSV: quoted fields may hold commas, doubled quotes and newlines; CRLF or LF rows.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// A whole-file JSON array, with the element index in errors (there are no useful lines).
fn read_json_array<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_owned(),
        source,
    })?;
    let values: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|source| EvalError::Parse {
            path: path.to_owned(),
            line: source.line(),
            message: format!("expected a JSON array: {source}"),
        })?;
    values
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            serde_json::from_value(value).map_err(|source| EvalError::Parse {
                path: path.to_owned(),
                line: i + 1,
                message: format!("array element {}: {source}", i + 1),
            })
        })
        .collect()
}

/// An open factoid question as the model sees it: the source's question with a question mark
/// (NQ-open has none) and the short-answer instruction.
fn factoid_prompt(question: &str) -> String {
    let question = question.trim();
    let mark = if question.ends_with('?') { "" } else { "?" };
    format!("{question}{mark} {FACTOID_INSTRUCTION}")
}

/// A factoid item graded by alias-list containment. The question itself is ignored in the
/// output, so that echoing it back ("who sings X: X is ...") never counts as an answer.
fn factoid_item(id: String, question: &str, answers: Vec<String>) -> Item {
    Item {
        id,
        prompt: factoid_prompt(question),
        grader: Grader::Contains {
            answers,
            ignore: vec![question.trim().trim_end_matches('?').to_owned()],
        },
        max_tokens: SHORT_ANSWER_TOKENS,
        stop: Vec::new(),
    }
}

#[derive(Deserialize)]
struct NqOpenRow {
    question: String,
    answer: Vec<String>,
}

/// NQ-open (EfficientQA dev): any of the `answer` list, contained after normalization.
fn read_nq_open(path: &Path) -> Result<Vec<Item>, EvalError> {
    read_lines(path)?
        .into_iter()
        .map(|(line, text)| {
            let row: NqOpenRow = parse_line(path, line, &text)?;
            if row.answer.iter().all(|a| normalize(a).is_empty()) {
                return Err(EvalError::Parse {
                    path: path.to_owned(),
                    line,
                    message: "no answer".to_owned(),
                });
            }
            Ok(factoid_item(
                format!("nq_open/{line}"),
                &row.question,
                row.answer,
            ))
        })
        .collect()
}

#[derive(Deserialize)]
struct WebQuestionsRow {
    #[serde(rename = "qId")]
    id: String,
    #[serde(rename = "qText")]
    question: String,
    answers: Vec<String>,
}

/// WebQuestions: any of `answers`, contained after normalization. A few gold answers are web
/// addresses left over from the source's scraping ("how old is X?" answered by a link): no
/// model output can match them, so those answers are dropped and an item left without any is
/// skipped rather than counted as a certain error.
fn read_webquestions(path: &Path) -> Result<Vec<Item>, EvalError> {
    let rows: Vec<WebQuestionsRow> = read_json_array(path)?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let answers: Vec<String> = row
                .answers
                .into_iter()
                .filter(|a| !is_web_address(a) && !normalize(a).is_empty())
                .collect();
            (!answers.is_empty())
                .then(|| factoid_item(format!("webquestions/{}", row.id), &row.question, answers))
        })
        .collect())
}

fn is_web_address(answer: &str) -> bool {
    let a = answer.trim_start();
    a.starts_with("http://") || a.starts_with("https://") || a.starts_with("www.")
}

#[derive(Deserialize)]
struct MawpsRow {
    #[serde(rename = "iIndex")]
    index: i64,
    #[serde(rename = "sQuestion")]
    question: String,
    /// Numbers in SingleEq, strings in AddSub.
    #[serde(rename = "lSolutions")]
    solutions: Vec<serde_json::Value>,
}

/// MAWPS (AddSub, SingleEq): gold is `lSolutions[0]`, compared with the last number in the
/// answer. The prompt asks for the calculation on one line before the number: a correct
/// answer is then a little longer than a bare guess, the length pattern the sum of log-probs
/// gets wrong.
fn read_mawps(path: &Path, part: &str) -> Result<Vec<Item>, EvalError> {
    let rows: Vec<MawpsRow> = read_json_array(path)?;
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let gold = match row.solutions.first() {
                Some(serde_json::Value::Number(n)) => n.as_f64(),
                Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
                _ => None,
            }
            .ok_or_else(|| EvalError::Parse {
                path: path.to_owned(),
                line: i + 1,
                message: format!("array element {}: lSolutions[0] is not a number", i + 1),
            })?;
            Ok(Item {
                id: format!("mawps/{part}/{}", row.index),
                prompt: format!(
                    "{}\nWrite the calculation on one line, then the final answer as a number.",
                    row.question.trim()
                ),
                grader: Grader::Numeric { answer: gold },
                max_tokens: ONE_STEP_TOKENS,
                stop: Vec::new(),
            })
        })
        .collect()
}

/// One line of the generic labeled format.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenericRow {
    id: Option<String>,
    prompt: String,
    answer: Option<serde_json::Value>,
    #[serde(default)]
    answers: Vec<String>,
    choices: Option<Vec<String>>,
    grading: Option<String>,
    max_tokens: Option<usize>,
    #[serde(default)]
    stop: Vec<String>,
}

/// Reads the generic format: one JSON object a line with `prompt`, `answer` (or `answers`, a
/// list of accepted answers and aliases), optional `choices` (a list, labelled A, B, ...),
/// optional `grading` (`contains`, `numeric` or `choice`; by default `choice` with choices,
/// else `contains`), optional `id`, `max_tokens` and `stop` (a list of stop sequences).
pub fn read_jsonl(path: &Path) -> Result<Vec<Item>, EvalError> {
    read_lines(path)?
        .into_iter()
        .map(|(line, text)| {
            let row: GenericRow = parse_line(path, line, &text)?;
            let bad = |message: String| EvalError::Parse {
                path: path.to_owned(),
                line,
                message,
            };
            let mut answers = row.answers;
            match row.answer {
                Some(serde_json::Value::String(s)) => answers.insert(0, s),
                Some(serde_json::Value::Number(n)) => answers.insert(0, n.to_string()),
                Some(other) => {
                    return Err(bad(format!(
                        "answer must be a string or number, got {other}"
                    )))
                }
                None => {}
            }
            if answers.is_empty() {
                return Err(bad("needs `answer` or `answers`".to_owned()));
            }
            let id = row.id.unwrap_or_else(|| format!("{line}"));
            let grading = row.grading.unwrap_or_else(|| {
                if row.choices.is_some() {
                    "choice"
                } else {
                    "contains"
                }
                .to_owned()
            });
            let mut item = match (grading.as_str(), row.choices) {
                ("choice", Some(texts)) => {
                    let labels: Vec<String> = (0..texts.len())
                        .map(|i| char::from(b'A' + (i % 26) as u8).to_string())
                        .collect();
                    // The answer may be given as the label or as the choice's text.
                    let answer = labels
                        .iter()
                        .zip(&texts)
                        .find(|(l, t)| answers.iter().any(|a| a == *l || a == *t))
                        .map(|(l, _)| l.clone())
                        .ok_or_else(|| bad("answer is neither a label nor a choice".to_owned()))?;
                    choice_item(id, &row.prompt, labels, texts, answer)
                }
                ("choice", None) => return Err(bad("grading `choice` needs `choices`".to_owned())),
                ("numeric", _) => {
                    let answer = answers
                        .iter()
                        .find_map(|a| last_number(a))
                        .ok_or_else(|| bad("numeric answer has no number".to_owned()))?;
                    Item {
                        id,
                        prompt: row.prompt,
                        grader: Grader::Numeric { answer },
                        max_tokens: ARITHMETIC_TOKENS,
                        stop: Vec::new(),
                    }
                }
                ("contains", _) => Item {
                    id,
                    prompt: row.prompt,
                    grader: Grader::Contains {
                        answers,
                        ignore: Vec::new(),
                    },
                    max_tokens: SHORT_ANSWER_TOKENS,
                    stop: Vec::new(),
                },
                (other, _) => return Err(bad(format!("unknown grading `{other}`"))),
            };
            if let Some(max_tokens) = row.max_tokens {
                item.max_tokens = max_tokens;
            }
            if row.stop.iter().any(String::is_empty) {
                return Err(bad("`stop` sequences must not be empty".to_owned()));
            }
            item.stop = row.stop;
            Ok(item)
        })
        .collect()
}

/// A reproducible subset: shuffled with `seed` (SplitMix64 Fisher-Yates, stable across
/// versions of any crate) and cut to `limit` when a limit is given; in source order otherwise.
pub fn select(mut items: Vec<Item>, limit: Option<usize>, seed: u64) -> Vec<Item> {
    if let Some(limit) = limit {
        let mut rng = SplitMix64(seed);
        for i in (1..items.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
        items.truncate(limit);
    }
    items
}

/// SplitMix64: a tiny generator whose output is fixed by its definition, so a `--seed` in the
/// docs selects the same items forever.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
    }

    #[test]
    fn csv_handles_quotes_commas_and_crlf() {
        let rows = parse_csv("\"a, \"\"b\"\"\",c\r\nd,\"e\nf\",g\r\n");
        assert_eq!(rows, vec![vec!["a, \"b\"", "c"], vec!["d", "e\nf", "g"]]);
    }

    #[test]
    fn selection_is_reproducible_and_limited() {
        let items: Vec<Item> = (0..50)
            .map(|i| Item {
                id: i.to_string(),
                prompt: String::new(),
                grader: Grader::Numeric { answer: 0.0 },
                max_tokens: 1,
                stop: Vec::new(),
            })
            .collect();
        let a = select(items.clone(), Some(10), 7);
        let b = select(items.clone(), Some(10), 7);
        let c = select(items.clone(), Some(10), 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 10);
        assert_eq!(select(items.clone(), None, 7), items);
    }

    #[test]
    fn generic_format_reads_every_grading_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"prompt": "Capital of Peru?", "answers": ["Lima"]}"#,
                "\n",
                r#"{"prompt": "2+2?", "answer": 4, "grading": "numeric"}"#,
                "\n",
                r#"{"id": "q3", "prompt": "Pick", "choices": ["x", "y"], "answer": "y"}"#,
                "\n",
            ),
        )
        .unwrap();
        let items = read_jsonl(&path).unwrap();
        assert!(items[0].grader.grade("It is Lima."));
        assert!(items[1].grader.grade("The answer is 4."));
        assert_eq!(items[2].id, "q3");
        assert!(items[2].prompt.contains("B. y"));
        assert!(items[2].grader.grade("B"));
        assert_eq!(Dataset::File(path).name(), "mine");
        assert!(items.iter().all(|i| i.stop.is_empty()));
    }

    #[test]
    fn generic_format_passes_stop_sequences_and_refuses_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fewshot.jsonl");
        std::fs::write(
            &path,
            r#"{"prompt": "Q: Capital of Peru?\nA:", "answers": ["Lima"], "stop": ["\n"], "max_tokens": 6}"#,
        )
        .unwrap();
        let items = read_jsonl(&path).unwrap();
        assert_eq!(items[0].stop, ["\n"]);
        assert_eq!(items[0].max_tokens, 6);
        std::fs::write(&path, r#"{"prompt": "p", "answers": ["a"], "stop": [""]}"#).unwrap();
        assert!(matches!(
            read_jsonl(&path),
            Err(EvalError::Parse { line: 1, .. })
        ));
    }

    #[test]
    fn webquestions_drops_web_address_answers_and_skips_items_left_without_any() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("val.json");
        std::fs::write(
            &path,
            r#"[{"qId": "a", "answers": ["Bahamian dollar"], "qText": "what money in bahamas?"},
                {"qId": "b", "answers": ["http://example.org/x"], "qText": "how old is x?"},
                {"qId": "c", "answers": ["www.x.org", "Rome"], "qText": "where is rome?"}]"#,
        )
        .unwrap();
        let items = read_webquestions(&path).unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["webquestions/a", "webquestions/c"]);
        assert!(items[0].grader.grade("The Bahamian dollar."));
        assert!(!items[0].grader.grade("US dollar"));
        // The echoed question does not count: "rome" is in it.
        assert!(!items[1].grader.grade("where is rome: in Europe"));
        assert!(items[1].grader.grade("Rome is in Italy"));
        assert!(items[1]
            .prompt
            .ends_with("where is rome? Answer with a short phrase only."));
    }

    #[test]
    fn nq_open_adds_the_question_mark_and_accepts_any_alias() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nq.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"question": "where does the sound of music take place", "answer": ["Salzburg, Austria", "Austria"]}"#,
                "\n",
            ),
        )
        .unwrap();
        let items = read_nq_open(&path).unwrap();
        assert_eq!(items[0].id, "nq_open/1");
        assert_eq!(
            items[0].prompt,
            "where does the sound of music take place? Answer with a short phrase only."
        );
        assert!(items[0].grader.grade("In Austria."));
        assert!(items[0].grader.grade("Salzburg, Austria"));
        assert!(!items[0].grader.grade("Vienna"));
        std::fs::write(&path, r#"{"question": "q", "answer": [""]}"#).unwrap();
        assert!(matches!(
            read_nq_open(&path),
            Err(EvalError::Parse { line: 1, .. })
        ));
    }

    #[test]
    fn mawps_reads_string_and_number_solutions_and_rejects_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(
            &path,
            r#"[{"iIndex": 1, "lSolutions": ["43"], "sQuestion": "70 - 27?", "lEquations": []},
                {"iIndex": 2, "lSolutions": [4.5], "sQuestion": "9 / 2?"}]"#,
        )
        .unwrap();
        let items = read_mawps(&path, "addsub").unwrap();
        assert_eq!(items[0].id, "mawps/addsub/1");
        assert!(items[0].grader.grade("70 - 27 = 43\nThe answer is 43."));
        assert!(!items[0].grader.grade("70 - 27 = 43. So 44"));
        assert!(items[1].grader.grade("9 / 2 = 4.5"));
        std::fs::write(
            &path,
            r#"[{"iIndex": 1, "lSolutions": [], "sQuestion": "q"}]"#,
        )
        .unwrap();
        let err = read_mawps(&path, "addsub").unwrap_err().to_string();
        assert!(err.contains("lSolutions[0]"), "{err}");
        std::fs::write(&path, r#"{"not": "an array"}"#).unwrap();
        assert!(read_mawps(&path, "addsub").is_err());
    }

    #[test]
    fn public_sets_parse_when_present() {
        let dir = data_dir();
        if !dir.join("SOURCES.md").exists() {
            return;
        }
        let capitals = Dataset::Capitals.load(&dir).unwrap();
        assert_eq!(capitals.len(), 122);
        assert!(capitals[0]
            .grader
            .grade("The capital of Albania is Tirana."));
        let arc = Dataset::Arc.load(&dir).unwrap();
        assert_eq!(arc.len(), 1188);
        let gsm8k = Dataset::Gsm8k.load(&dir).unwrap();
        assert_eq!(gsm8k.len(), 1319);
        assert!(gsm8k[0].grader.grade("so she makes 18 dollars"));
        let mmlu = Dataset::Mmlu.load(&dir).unwrap();
        assert_eq!(mmlu.len(), 14042);
        let nq = Dataset::NqOpen.load(&dir).unwrap();
        assert_eq!(nq.len(), 1800);
        let webquestions = Dataset::WebQuestions.load(&dir).unwrap();
        assert!(webquestions.len() > 700 && webquestions.len() <= 755);
        assert!(webquestions[0].grader.grade("the Bahamian dollar"));
        let mawps = Dataset::Mawps.load(&dir).unwrap();
        assert_eq!(mawps.len(), 903);
        assert!(mawps[0].grader.grade("70 - 27 = 43"));
    }
}
