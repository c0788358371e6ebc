"""demo.py's settings: the quick demo of `make demo` and the three-task one of `make demo-all`."""

import demo


def test_the_full_demo_is_the_default():
    args = demo.parse_args([])
    assert (args.tasks, args.num_test_users, args.work_dir) == (demo.DEMO_TASKS, 4, "demo_run")


def test_quick_runs_one_task_with_three_users_in_its_own_folder():
    args = demo.parse_args(["--quick"])
    assert (args.tasks, args.num_test_users, args.work_dir) == ("news_categorize", 3, "demo_run/quick")


def test_flags_given_win_over_quick():
    args = demo.parse_args(["--quick", "--tasks", "product_rating", "--num_test_users", "2", "--work_dir", "w"])
    assert (args.tasks, args.num_test_users, args.work_dir) == ("product_rating", 2, "w")
