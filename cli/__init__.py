"""The `potstill` command: a thin typer layer over store/, teacher_gen/ and student_train/."""
