"""Everything that knows about process groups: distributed init, megatron-core glue, tensor-parallel
layers, DeepSpeed wiring and the CPU/gloo shim. Model code asks a layer spec for its linears and
never touches a process group itself."""
