class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message lists every problem found."""
