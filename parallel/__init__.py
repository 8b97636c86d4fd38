"""Everything that knows about ranks and communication."""
