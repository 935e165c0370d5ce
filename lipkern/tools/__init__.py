"""The command-line tools around the library (benchmarks, verification, the traffic model, the GPU check), kept apart from the ops they measure."""
