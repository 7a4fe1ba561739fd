module otelbpf/tools/helm_template

go 1.22
