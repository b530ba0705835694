"""Prepared-dataset format, sample schema, synthetic world and official-format converters."""
