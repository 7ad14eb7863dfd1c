"""DeepSpeed's ``mpu`` interface over megatron-core parallel_state (so ZeRO shards over the data-parallel group
only and reduces gradient norms over the model-parallel group)."""
from megatron.core import parallel_state as ps


class MegatronMPU:
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)

    @staticmethod
    def get_model_parallel_rank():
        return ps.get_tensor_model_parallel_rank() + ps.get_tensor_model_parallel_world_size() * \
            ps.get_pipeline_model_parallel_rank()

    @staticmethod
    def get_model_parallel_world_size():
        return ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()

    @staticmethod
    def get_sequence_parallel_world_size():
        return 1
