"""The bench's labeled retrieval set, read from WordNet's data files."""

from __future__ import annotations

import pytest

from bench.retrieval import WORDNET, labeled_set, parse_line

LINE = (
    "02958343 06 n 05 car 0 auto 0 automobile 0 machine 6 motorcar 0 002 @ 03791235 n 0000 ~ 02701002 n 0000 "
    '| a motor vehicle with four wheels; usually propelled by an internal combustion engine; "he needs a car to '
    'get to work"  \n'
)


def test_a_sense_is_read_with_its_words_definition_and_examples() -> None:
    sense = parse_line(LINE, "n")
    assert sense is not None
    assert sense.id == "n02958343"
    assert sense.words == ("car", "auto", "automobile", "machine", "motorcar")
    assert sense.definition == "a motor vehicle with four wheels; usually propelled by an internal combustion engine"
    assert sense.examples == ("he needs a car to get to work",)
    assert sense.doc().title == "car, auto, automobile, machine, motorcar"
    assert parse_line("  1 This software and database is being provided\n", "n") is None
    adjective = parse_line("00001740 00 a 01 galore(ip) 0 000 | abundant  \n", "a")
    assert adjective is not None and adjective.words == ("galore",)


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="needs Debian's wordnet-base (.ci/run installs it)")
def test_the_labeled_set_labels_every_query_with_a_document_it_holds() -> None:
    labeled = labeled_set(500, 50)
    ids = [d.id for d in labeled.docs]
    assert len(ids) == len(set(ids)) == 500
    assert len(labeled.queries) == 50
    assert all(relevant in set(ids) for _, relevant in labeled.queries)
    # Words with many senses come first: the first word's senses share a word and differ in meaning.
    assert len({d.title.split(", ")[0] for d in labeled.docs[:10]}) < 10
