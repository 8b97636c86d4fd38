"""The parallelism planner (`python -m launch.plan`): every valid 5D layout of a model on a
cluster, with the memory each rank needs and the time a step takes, estimated."""
