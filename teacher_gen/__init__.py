"""Teacher generation: run a teacher over prompts and fill a store."""
