

def test_a_device_lr_is_saved_as_its_value(tmp_path):
    # the fused, capturable AdamW of CUDA runs holds its lr as a tensor; a checkpoint stores the number
    from fastmask.checkpoint_io import load_checkpoint, save_checkpoint

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=torch.tensor(2.5e-4), foreach=False)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, model=net, ema=None, optimizer=opt, step=1, config={})
    groups = load_checkpoint(path)["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(2.5e-4) and isinstance(groups[0]["lr"], float)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the optimizer's own is untouched
