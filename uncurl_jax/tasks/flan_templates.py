"""Instruction templates of the FLAN-style mixture, by task family.

Written in the spirit of the FLAN collection (Wei et al. 2021; Longpre et al.
2023): several natural-language phrasings per family, options listed after
"OPTIONS:", the answer text as target. Each template is a pair of Python format
strings (inputs, targets) over the fields that `flan.py` extracts; `{options}` is
the option listing ("\\n- a\\n- b") and `{answer}` the right answer's text.

Example:
  >>> inputs, targets = TEMPLATES["nli"][0]
  >>> sorted(TEMPLATES)[:3]
  ['closed_book_qa', 'extractive_qa', 'multiple_choice']
"""

from __future__ import annotations

TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    # premise, hypothesis -> yes / it is not possible to tell / no
    "nli": (
        ("Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the "
         "hypothesis?\nOPTIONS:{options}", "{answer}"),
        ("{premise}\n\nBased on the paragraph above can we conclude that "
         "\"{hypothesis}\"?\n\nOPTIONS:{options}", "{answer}"),
        ("Read the text and determine if the sentence is true:\n\n{premise}\n\n"
         "Sentence: {hypothesis}\nOPTIONS:{options}\nA:", "{answer}"),
        ("Can we draw the following hypothesis from the context?\n\nContext:\n\n{premise}"
         "\n\nHypothesis: {hypothesis}\nOPTIONS:{options}", "{answer}"),
    ),
    # question, sentence -> yes / no
    "answer_entailment": (
        ("Does the sentence \"{sentence}\" answer the question \"{question}\"?\n"
         "OPTIONS:{options}", "{answer}"),
        ("Question: {question}\nAnswer: {sentence}\nIs this answer to the question "
         "correct?\nOPTIONS:{options}", "{answer}"),
        ("{question}\nIs \"{sentence}\" a good answer to this question?\nOPTIONS:{options}",
         "{answer}"),
    ),
    # sentence1, sentence2 -> no / yes
    "paraphrase": (
        ("{sentence1}\n{sentence2}\nAre these two sentences paraphrases of each other?\n"
         "OPTIONS:{options}", "{answer}"),
        ("Do the following two sentences have the same meaning?\n{sentence1}\n{sentence2}\n\n"
         "OPTIONS:{options}", "{answer}"),
        ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo these two sentences convey "
         "the same information?\nOPTIONS:{options}", "{answer}"),
    ),
    # text -> negative / positive
    "sentiment": (
        ("{text}\nWhat is the sentiment of this review?\nOPTIONS:{options}", "{answer}"),
        ("{text}\nIs this review positive or negative?\nOPTIONS:{options}", "{answer}"),
        ("Review: {text}\nHow would you describe the sentiment of this review?\n"
         "OPTIONS:{options}", "{answer}"),
    ),
    # text -> topic name
    "topic": (
        ("{text}\n\nWhat is this text about?\nOPTIONS:{options}", "{answer}"),
        ("Which topic is this article about?\n\n{text}\nOPTIONS:{options}", "{answer}"),
        ("Select your answer: which category best describes the following?\n{text}\n"
         "OPTIONS:{options}", "{answer}"),
    ),
    # context, question -> answer span
    "extractive_qa": (
        ("Read this and answer the question\n\n{context}\n\n{question}", "{answer}"),
        ("{context}\nQ: {question}\nA:", "{answer}"),
        ("Answer a question about this article:\n{context}\n{question}", "{answer}"),
    ),
    # question -> answer (no context)
    "closed_book_qa": (
        ("{question}", "{answer}"),
        ("Answer the following question. {question}", "{answer}"),
        ("Q: {question}\nA:", "{answer}"),
        ("Trivia question: {question}\nAnd the answer is?", "{answer}"),
    ),
    # question (with any context) -> one of the options
    "multiple_choice": (
        ("{question}\nOPTIONS:{options}", "{answer}"),
        ("Choose the correct answer: {question}\nOPTIONS:{options}", "{answer}"),
        ("{question}\n\nPick the best answer from the following options:{options}",
         "{answer}"),
    ),
}
