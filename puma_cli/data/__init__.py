"""In-memory data: the `Dataset` every layer passes around, synthetic sets, markings."""
