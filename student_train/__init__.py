"""Student training: stream a store into a student with sparse KD losses."""
