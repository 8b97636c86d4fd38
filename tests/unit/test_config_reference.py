"""docs/configuration.md is generated from the schema and never stale; every key has a doc line."""
from launch import config_reference, schema


def test_the_reference_is_up_to_date():
    assert config_reference.OUT.read_text() == config_reference.render(), \
        "docs/configuration.md is stale: run python -m launch.config_reference"


def test_every_key_has_a_doc_line_and_every_number_a_range():
    rows = config_reference.rows(schema.QuintetConfig)
    assert len(rows) > 80
    assert not [key for key, _, _, doc in rows if not doc], "keys without a doc comment in launch/schema.py"
