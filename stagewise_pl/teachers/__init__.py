"""Teachers: where reasoning traces and critiques come from (see :mod:`stagewise_pl.teachers.base`)."""
from stagewise_pl.teachers.base import TEACHERS, Teacher, TeacherError, VERDICT_CORRECT, VERDICT_INCORRECT
from stagewise_pl.teachers import programmatic, trace_file  # noqa: F401  (registers the built-in teachers)

__all__ = ["TEACHERS", "Teacher", "TeacherError", "VERDICT_CORRECT", "VERDICT_INCORRECT"]
