"""Persian chat data: sources, normalisation, validation, sampling and splitting."""
