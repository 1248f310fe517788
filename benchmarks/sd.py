"""The real Stable Diffusion architectures, from their config.json files (non-default fields only).

Tests and benchmarks build them on the meta device, on fake tensors or with random weights: nothing to download.
"""
SD15 = dict(  # stable-diffusion-v1-5 unet/: 859.52M parameters
    sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SD21 = dict(SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True)  # stable-diffusion-2-1 unet/ (768 px): 865.91M; -base is sample_size 64
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower (CLIPTextConfig): 123.06M
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
SD21_TEXT = dict(SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 projection_dim=512, hidden_act="gelu")  # OpenCLIP ViT-H/14's text tower, 23 of 24 layers: 340.39M
SD_VAE = dict(  # vae/ of both (AutoencoderKL): 83.65M
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD_SCHEDULE = dict(  # scheduler/ of SD1.5 and SD2.1-base (epsilon prediction), as a DDPMScheduler
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
