//! A chat fine-tuning set made from the committed Shakespeare corpus
//! (`data/shakespeare.txt`): the user quotes a few lines of a named play (with its act and
//! scene) or poem and asks for what follows; the assistant answers with the lines that
//! follow in the text, speaker names, stage directions and verse layout as printed.
//!
//! The corpus is 42 works concatenated; each opens with its title line and
//! `by William Shakespeare` (a work's last line runs into the next title, without a
//! newline). Each work is cut into paragraphs (runs of non-blank lines); in a play a
//! paragraph is a speech (its first line the speaker: `HAMLET.`, `Ham.`) or a stage
//! direction. A play's front matter (the persons represented) is skipped up to its first
//! `ACT`, `PROLOGUE` or `INDUCTION` heading; headings (`ACT`, `SCENE`, `PROLOGUE`,
//! `EPILOGUE`, `INDUCTION`, a sonnet's numeral) are never quoted, and name the place a
//! passage comes from. A passage never crosses a heading.
//!
//! Every passage is cut from one section in order: a context of whole paragraphs (at
//! most [`CONTEXT_LINES_MAX`] lines; the first lines of a longer paragraph), then an
//! answer of the paragraphs that follow, up to [`ANSWER_CHARS_MAX`] characters, cut back
//! (by paragraphs, then by lines when one is left) until the conversation renders to at
//! most `tokens_max` tokens. Passages do
//! not overlap; every [`KEEP_EVERY`]-th one is kept, so the set spreads over the whole
//! corpus and a holdout cut from it shares no text with the rest. Deterministic: the same
//! corpus and token counter give the same conversations.

use serde::Serialize;

use crate::ChatMessage;

/// The most lines a context quotes.
pub const CONTEXT_LINES_MAX: usize = 8;
/// The lines quoted from a paragraph longer than [`CONTEXT_LINES_MAX`].
pub const CONTEXT_LINES_OF_LONG: usize = 4;
/// The most characters an answer has before the token bound cuts it further.
pub const ANSWER_CHARS_MAX: usize = 700;
/// One passage in this many is kept in the committed set.
pub const KEEP_EVERY: usize = 3;
/// The most tokens a conversation of the committed set renders to.
pub const TOKENS_MAX: usize = 256;

/// What [`conversations`] makes.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The most tokens one conversation renders to.
    pub tokens_max: usize,
    /// One passage in this many is kept (at least 1).
    pub keep_every: usize,
}

impl Default for Options {
    /// The committed set's: [`TOKENS_MAX`], [`KEEP_EVERY`].
    fn default() -> Options {
        Options {
            tokens_max: TOKENS_MAX,
            keep_every: KEEP_EVERY,
        }
    }
}

/// The works in corpus order: the title as the corpus prints it, and as a prompt names it.
const WORKS: [(&str, &str); 42] = [
    ("ALL'S WELL THAT ENDS WELL", "All's Well That Ends Well"),
    ("ANTONY AND CLEOPATRA", "Antony and Cleopatra"),
    ("AS YOU LIKE IT", "As You Like It"),
    ("THE COMEDY OF ERRORS", "The Comedy of Errors"),
    ("THE TRAGEDY OF CORIOLANUS", "Coriolanus"),
    ("CYMBELINE", "Cymbeline"),
    ("HAMLET, PRINCE OF DENMARK", "Hamlet"),
    ("KING HENRY IV, THE FIRST PART", "Henry IV, Part 1"),
    ("KING HENRY IV, SECOND PART", "Henry IV, Part 2"),
    ("THE LIFE OF KING HENRY V", "Henry V"),
    ("KING HENRY VI, FIRST PART", "Henry VI, Part 1"),
    (
        "HISTORY OF KING HENRY THE SIXTH, SECOND PART",
        "Henry VI, Part 2",
    ),
    (
        "THE HISTORY OF KING HENRY THE SIXTH, THIRD PART",
        "Henry VI, Part 3",
    ),
    ("THE LIFE OF HENRY THE EIGHTH", "Henry VIII"),
    ("KING JOHN", "King John"),
    ("JULIUS CAESAR", "Julius Caesar"),
    ("THE TRAGEDY OF KING LEAR", "King Lear"),
    ("A LOVER'S COMPLAINT", "A Lover's Complaint"),
    ("LOVE'S LABOUR'S LOST", "Love's Labour's Lost"),
    ("MACBETH", "Macbeth"),
    ("MEASURE FOR MEASURE", "Measure for Measure"),
    ("THE MERCHANT OF VENICE", "The Merchant of Venice"),
    ("THE MERRY WIVES OF WINDSOR", "The Merry Wives of Windsor"),
    ("A MIDSUMMER NIGHT'S DREAM", "A Midsummer Night's Dream"),
    ("MUCH ADO ABOUT NOTHING", "Much Ado About Nothing"),
    ("OTHELLO, THE MOOR OF VENICE", "Othello"),
    ("THE PASSIONATE PILGRIM", "The Passionate Pilgrim"),
    ("PERICLES PRINCE OF TYRE", "Pericles"),
    ("THE PHOENIX AND THE TURTLE", "The Phoenix and the Turtle"),
    ("THE RAPE OF LUCRECE", "The Rape of Lucrece"),
    ("THE TRAGEDY OF KING RICHARD THE SECOND", "Richard II"),
    ("THE LIFE AND DEATH OF KING RICHARD III", "Richard III"),
    ("ROMEO AND JULIET", "Romeo and Juliet"),
    ("THE SONNETS", "the Sonnets"),
    ("THE TAMING OF THE SHREW", "The Taming of the Shrew"),
    ("THE TEMPEST", "The Tempest"),
    ("THE LIFE OF TIMON OF ATHENS", "Timon of Athens"),
    ("THE TRAGEDY OF TITUS ANDRONICUS", "Titus Andronicus"),
    (
        "THE HISTORY OF TROILUS AND CRESSIDA",
        "Troilus and Cressida",
    ),
    ("TWELFTH NIGHT; OR, WHAT YOU WILL", "Twelfth Night"),
    ("THE TWO GENTLEMEN OF VERONA", "The Two Gentlemen of Verona"),
    ("THE WINTER'S TALE", "The Winter's Tale"),
];

const BYLINE: &str = "by William Shakespeare";

/// Why the corpus cannot be made into conversations.
#[derive(Debug, thiserror::Error)]
pub enum ShakespeareChatError<E: std::error::Error + 'static> {
    #[error("the corpus has {found} `{BYLINE}` lines, expected {}", WORKS.len())]
    Works { found: usize },
    #[error("line {line}: expected a line ending with the title {title:?}")]
    Title { line: usize, title: &'static str },
    #[error("counting a conversation's tokens: {0}")]
    Count(#[source] E),
}

/// One work of the corpus, cut into sections of paragraphs.
#[derive(Debug)]
struct Work<'a> {
    name: &'static str,
    /// `true` for a play (it has `ACT` headings).
    play: bool,
    sections: Vec<Section<'a>>,
}

/// Paragraphs between two headings, and the place they are at (`Act I, Scene 2`,
/// `Sonnet XVIII`, or empty).
#[derive(Debug)]
struct Section<'a> {
    place: String,
    paragraphs: Vec<Vec<&'a str>>,
}

/// The works of `corpus`, with their sections.
fn works<E: std::error::Error>(corpus: &str) -> Result<Vec<Work<'_>>, ShakespeareChatError<E>> {
    // Indentation (centred headings, a sonnet's couplet) is dropped: a turn that opened
    // with spaces would merge with the template's newline before it.
    let lines: Vec<&str> = corpus.lines().map(str::trim).collect();
    let bylines: Vec<usize> = (0..lines.len()).filter(|&i| lines[i] == BYLINE).collect();
    if bylines.len() != WORKS.len() {
        return Err(ShakespeareChatError::Works {
            found: bylines.len(),
        });
    }
    // The title lines, and each work's last line (the part of the next title line before
    // the title, unless it is empty or `THE END`).
    let mut starts = Vec::with_capacity(WORKS.len());
    let mut tails = Vec::with_capacity(WORKS.len());
    let mut bodies = Vec::with_capacity(WORKS.len());
    for (&b, (title, _)) in bylines.iter().zip(WORKS) {
        // The title is the last non-blank line before the byline (one blank line between
        // them in all works but the Sonnets).
        let line = (0..b).rev().find(|&l| !lines[l].is_empty()).unwrap_or(0);
        let tail = lines[line]
            .strip_suffix(title)
            .ok_or(ShakespeareChatError::Title {
                line: line + 1,
                title,
            })?;
        starts.push(line);
        bodies.push(b + 1);
        tails.push(tail);
    }
    let mut out = Vec::with_capacity(WORKS.len());
    for (w, (&body_start, (_, name))) in bodies.iter().zip(WORKS).enumerate() {
        let end = starts.get(w + 1).copied().unwrap_or(lines.len());
        let mut body: Vec<&str> = lines[body_start..end].to_vec();
        match tails.get(w + 1) {
            Some(&tail) if !tail.is_empty() && tail != "THE END" => body.push(tail),
            _ => {}
        }
        out.push(cut_work(name, &body));
    }
    Ok(out)
}

/// The kind of heading a paragraph is, if it is one.
fn heading(paragraph: &[&str], play: bool) -> Option<String> {
    let first = paragraph.first()?.trim();
    if play {
        // Timon of Athens writes `Act I.` and `Scene I.--Athens.`.
        let first = first.to_uppercase();
        for word in ["ACT", "SCENE", "PROLOGUE", "EPILOGUE", "INDUCTION"] {
            if first == word
                || first.starts_with(&format!("{word} "))
                || first.starts_with(&format!("{word}."))
            {
                // The whole paragraph: Timon of Athens puts act and scene on two lines.
                return Some(paragraph.join(" ").to_uppercase());
            }
        }
        None
    } else {
        let numeral = !first.is_empty() && first.chars().all(|c| "IVXLC".contains(c));
        (paragraph.len() == 1 && numeral).then(|| first.to_string())
    }
}

/// `ACT II. SCENE 3. A room.` -> (`Act II`, `Scene 3`); `SCENE IV.` -> (none, `Scene IV`).
fn place_of(heading: &str) -> (Option<String>, Option<String>) {
    let mut act = None;
    let mut scene = None;
    let words: Vec<&str> = heading
        .split(|c: char| c.is_whitespace() || ".,-:".contains(c))
        .filter(|w| !w.is_empty())
        .collect();
    for (i, w) in words.iter().enumerate() {
        let next = words.get(i + 1).map(|n| n.to_string());
        match *w {
            "ACT" => act = next.map(|n| format!("Act {}", titlecase(&n))),
            "SCENE" => scene = next.map(|n| format!("Scene {}", titlecase(&n))),
            "PROLOGUE" | "EPILOGUE" | "INDUCTION" if i == 0 => scene = Some(titlecase(w)),
            _ => {}
        }
    }
    (act, scene)
}

/// Roman numerals and digits stay as they are; words (`FIRST`) get a capital only.
fn titlecase(word: &str) -> String {
    if word
        .chars()
        .all(|c| "IVXLC".contains(c) || c.is_ascii_digit())
    {
        return word.to_string();
    }
    let lower = word.to_lowercase();
    let mut chars = lower.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn cut_work<'a>(name: &'static str, body: &[&'a str]) -> Work<'a> {
    let paragraphs: Vec<Vec<&'a str>> = body
        .split(|l| l.trim().is_empty())
        .filter(|p| !p.is_empty())
        .map(<[&str]>::to_vec)
        .filter(|p| !(p.len() == 1 && p[0].trim() == "THE END"))
        .collect();
    let first_act = paragraphs.iter().position(|p| {
        let first = p[0].to_uppercase();
        ["ACT ", "PROLOGUE", "INDUCTION"]
            .iter()
            .any(|w| first.starts_with(w))
    });
    let play = paragraphs
        .iter()
        .any(|p| p[0].to_uppercase().starts_with("ACT "));
    let skip = if play { first_act.unwrap_or(0) } else { 0 };
    let mut sections = vec![Section {
        place: String::new(),
        paragraphs: Vec::new(),
    }];
    let (mut act, mut scene): (Option<String>, Option<String>) = (None, None);
    for p in paragraphs.into_iter().skip(skip) {
        match heading(&p, play) {
            Some(h) if play => {
                let (a, s) = place_of(&h);
                if a.is_some() {
                    act = a;
                    scene = None;
                }
                if s.is_some() {
                    scene = s;
                }
                let place = [act.clone(), scene.clone()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", ");
                sections.push(Section {
                    place,
                    paragraphs: Vec::new(),
                });
            }
            Some(numeral) => sections.push(Section {
                place: format!("Sonnet {numeral}"),
                paragraphs: Vec::new(),
            }),
            None => {
                if let Some(section) = sections.last_mut() {
                    section.paragraphs.push(p);
                }
            }
        }
    }
    sections.retain(|s| !s.paragraphs.is_empty());
    Work {
        name,
        play,
        sections,
    }
}

/// The user's request: the work, the place and the quoted lines. Three phrasings, picked
/// by the passage's number.
fn prompt(work: &Work<'_>, place: &str, context: &str, n: usize) -> String {
    let from = match (work.play, place.is_empty()) {
        (true, false) => format!("{}, {place}", work.name),
        (true, true) => work.name.to_string(),
        (false, _) if place.starts_with("Sonnet") => format!("Shakespeare's {place}"),
        (false, _) => format!("Shakespeare's poem {}", work.name),
    };
    let what = if work.play { "scene" } else { "poem" };
    match n % 3 {
        0 => format!("Continue this passage from {from}:\n\n{context}"),
        1 => format!("Here are some lines from {from}.\n\n{context}\n\nWhat comes next?"),
        _ => format!("{context}\n\nThat is from {from}. Go on with the {what}."),
    }
}

/// The conversations of `corpus`, each rendering to at most `options.tokens_max` tokens
/// by `count_tokens` (the model's chat template and tokenizer: see
/// [`crate::tokenize_chat`]).
pub fn conversations<E: std::error::Error + 'static>(
    corpus: &str,
    options: Options,
    mut count_tokens: impl FnMut(&[ChatMessage]) -> Result<usize, E>,
) -> Result<Vec<Vec<ChatMessage>>, ShakespeareChatError<E>> {
    let mut out = Vec::new();
    let mut n = 0usize;
    for work in works::<E>(corpus)? {
        for section in &work.sections {
            let ps = &section.paragraphs;
            let mut i = 0;
            while i < ps.len() {
                // The context: whole paragraphs, or the head of a long one (then the
                // answer opens with the rest of it).
                let mut context: Vec<&str> = Vec::new();
                let mut rest: &[&str] = &[];
                let mut j = i;
                if ps[i].len() > CONTEXT_LINES_MAX {
                    context.extend(&ps[i][..CONTEXT_LINES_OF_LONG]);
                    rest = &ps[i][CONTEXT_LINES_OF_LONG..];
                    j += 1;
                } else {
                    while j < ps.len() && context_len(&context) + ps[j].len() <= CONTEXT_LINES_MAX {
                        if !context.is_empty() {
                            context.push("");
                        }
                        context.extend(&ps[j]);
                        j += 1;
                    }
                }
                // The answer: lines with blank lines between paragraphs, up to the
                // character bound (at least one line).
                let mut answer: Vec<&str> = rest.to_vec();
                let mut next = j;
                while next < ps.len() {
                    let mut with = answer.clone();
                    if !with.is_empty() {
                        with.push("");
                    }
                    with.extend(&ps[next]);
                    if chars(&with) > ANSWER_CHARS_MAX {
                        if answer.is_empty() {
                            answer = ps[next].clone();
                            next += 1;
                        }
                        break;
                    }
                    answer = with;
                    next += 1;
                }
                i = next.max(i + 1);
                if answer.is_empty() {
                    continue;
                }
                let keep = n.is_multiple_of(options.keep_every.max(1));
                n += 1;
                if !keep {
                    continue;
                }
                let user = prompt(&work, &section.place, &context.join("\n"), out.len());
                while answer.last().is_some_and(|l| l.is_empty()) {
                    answer.pop();
                }
                let mut answer: &[&str] = &answer;
                while !answer.is_empty() {
                    let messages = vec![
                        ChatMessage::user(&user),
                        ChatMessage {
                            role: "assistant".into(),
                            content: answer.join("\n"),
                        },
                    ];
                    if count_tokens(&messages).map_err(ShakespeareChatError::Count)?
                        <= options.tokens_max
                    {
                        out.push(messages);
                        break;
                    }
                    // Too long: drop the last paragraph while there are two or more
                    // (so no answer ends on a speaker's name alone), else the last line.
                    let cut = answer
                        .iter()
                        .rposition(|l| l.is_empty())
                        .unwrap_or(answer.len() - 1);
                    answer = &answer[..cut];
                }
            }
        }
    }
    Ok(out)
}

fn context_len(context: &[&str]) -> usize {
    context.iter().filter(|l| !l.is_empty()).count()
}

fn chars(lines: &[&str]) -> usize {
    lines.iter().map(|l| l.len() + 1).sum()
}

/// One JSONL line: `{"messages":[{"role":..,"content":..},..]}`, keys in that order.
#[derive(Serialize)]
struct Line<'a> {
    messages: &'a [ChatMessage],
}

/// The conversations as chat JSONL, one a line, each line ending with a newline.
pub fn to_jsonl(conversations: &[Vec<ChatMessage>]) -> String {
    let mut out = String::new();
    for messages in conversations {
        // Strings and a slice of plain structs always serialize.
        if let Ok(line) = serde_json::to_string(&Line { messages }) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A corpus of 42 works with `body` as the first one's text and the others empty,
    /// made into conversations with tokens counted as characters / 4 (plus 20, the
    /// template's system turn), at most `tokens_max`; each conversation is printed.
    #[track_caller]
    fn check(body: &str, tokens_max: usize, keep_every: usize, expect: expect_test::Expect) {
        let mut corpus = String::new();
        for (i, (title, _)) in WORKS.iter().enumerate() {
            corpus.push_str(title);
            corpus.push_str("\n\nby William Shakespeare\n\n\n\n");
            if i == 0 {
                corpus.push_str(body);
            } else {
                corpus.push_str("[Exeunt.]");
            }
        }
        let options = Options {
            tokens_max,
            keep_every,
        };
        let got = conversations(&corpus, options, |m: &[ChatMessage]| {
            Ok::<_, std::fmt::Error>(20 + m.iter().map(|m| m.content.len()).sum::<usize>() / 4)
        });
        let text = match got {
            Err(e) => format!("error: {e}"),
            Ok(cs) => cs
                .iter()
                .map(|c| {
                    c.iter()
                        .map(|m| format!("[{}]\n{}", m.role, m.content))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect::<Vec<_>>()
                .join("\n----\n"),
        };
        expect.assert_eq(&text);
    }

    #[test]
    fn passages_from_a_play() {
        let speech = |who: &str, n: usize| {
            let lines: Vec<String> = (1..=n).map(|i| format!("{who} line {i}.")).collect();
            format!("{who}.\n{}\n\n", lines.join("\n"))
        };
        let mut body = String::from(
            "PERSONS REPRESENTED.\n\nKING.\nQUEEN.\n\nACT I.\n\nSCENE 1. A room.\n\n[Enter KING.]\n\n",
        );
        for i in 0..6 {
            body.push_str(&speech(if i % 2 == 0 { "KING" } else { "QUEEN" }, 2 + i));
        }
        body.push_str("SCENE 2. Another room.\n\n");
        body.push_str(&speech("FOOL", 12));
        body.push_str(&speech("KING", 1));
        check(
            &body,
            120,
            1,
            expect_test::expect![[r#"
            [user]
            Continue this passage from All's Well That Ends Well, Act I, Scene 1:

            [Enter KING.]

            KING.
            KING line 1.
            KING line 2.

            QUEEN.
            QUEEN line 1.
            QUEEN line 2.
            QUEEN line 3.
            [assistant]
            KING.
            KING line 1.
            KING line 2.
            KING line 3.
            KING line 4.

            QUEEN.
            QUEEN line 1.
            QUEEN line 2.
            QUEEN line 3.
            QUEEN line 4.
            QUEEN line 5.

            KING.
            KING line 1.
            KING line 2.
            KING line 3.
            KING line 4.
            KING line 5.
            KING line 6.
            ----
            [user]
            Here are some lines from All's Well That Ends Well, Act I, Scene 2.

            FOOL.
            FOOL line 1.
            FOOL line 2.
            FOOL line 3.

            What comes next?
            [assistant]
            FOOL line 4.
            FOOL line 5.
            FOOL line 6.
            FOOL line 7.
            FOOL line 8.
            FOOL line 9.
            FOOL line 10.
            FOOL line 11.
            FOOL line 12.

            KING.
            KING line 1."#]],
        );
        // Every second passage: the first of the two.
        check(
            &body,
            120,
            2,
            expect_test::expect![[r#"
            [user]
            Continue this passage from All's Well That Ends Well, Act I, Scene 1:

            [Enter KING.]

            KING.
            KING line 1.
            KING line 2.

            QUEEN.
            QUEEN line 1.
            QUEEN line 2.
            QUEEN line 3.
            [assistant]
            KING.
            KING line 1.
            KING line 2.
            KING line 3.
            KING line 4.

            QUEEN.
            QUEEN line 1.
            QUEEN line 2.
            QUEEN line 3.
            QUEEN line 4.
            QUEEN line 5.

            KING.
            KING line 1.
            KING line 2.
            KING line 3.
            KING line 4.
            KING line 5.
            KING line 6."#]],
        );
    }

    #[test]
    fn a_broken_corpus_is_an_error() {
        let got = conversations(
            "HAMLET\n\nby William Shakespeare\n",
            Options::default(),
            |_| Ok::<_, std::fmt::Error>(0),
        );
        assert_eq!(
            got.map_err(|e| e.to_string()),
            Err("the corpus has 1 `by William Shakespeare` lines, expected 42".to_string())
        );
    }
}
