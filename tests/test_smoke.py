def test_dispatch_then_consume_handles_each_message_once(project):
    for n in range(20):
        assert project.cli("dispatch", "note", '{"n": %d}' % n).returncode == 0
    result = project.cli("consume", "async", "--limit", "20", "--time-limit", "20")
    assert result.returncode == 0, result.stderr
    assert project.values() == sorted(str(n) for n in range(20))
    assert "message limit of 20 reached" in result.stderr
