"""Teachers: where reasoning traces and critiques come from (see :mod:`stagewise_pl.teachers.base`)."""
from stagewise_pl.teachers.base import TEACHERS, Teacher, TeacherError, VERDICT_CORRECT, VERDICT_INCORRECT
# importing a teacher's module registers it; none imports a heavy library until a teacher is used
from stagewise_pl.teachers import dataset, http, programmatic, trace_file, vllm_teacher

__all__ = ["TEACHERS", "Teacher", "TeacherError", "VERDICT_CORRECT", "VERDICT_INCORRECT",
           "dataset", "http", "programmatic", "trace_file", "vllm_teacher"]
